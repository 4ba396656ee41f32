"""Storage over fsspec: a checkpoint directory at any URL, ranged reads, writes, atomic commit.

Every backend quirk lives here, commented with the why. URLs stay ``str`` end to end
(``pathlib.Path`` would turn ``s3://bucket`` into ``s3:/bucket``). Errors become
``CheckpointError`` subclasses naming the URL of the file concerned.

Writes are never visible under their final name until complete: on local disk a file is
written to a temporary sibling, fsynced and renamed into place; on object stores an object
appears only when its upload finishes. A checkpoint's commit point is ``manifest.json``,
written last by :meth:`Location.write_atomic`.

S3 (``s3://``, ``s3a://``) goes through s3fs's client with direct object calls (one ranged GET
per read, multipart uploads filled by positioned writes, see :class:`_S3Dir`), every call retried
on transient errors by :class:`zero_ckpt.retry.RetryPolicy`; other remote backends go through
their fsspec filesystem, their calls retried on connection errors.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import posixpath
import re
import socket
import stat
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from hashlib import md5
from typing import Any, Awaitable, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from zero_ckpt import knobs
from zero_ckpt.checksum import crc32c
from zero_ckpt.errors import (
    CheckpointError,
    CorruptShardError,
    DestinationExistsError,
    MissingShardError,
    NotRegularFileError,
    StorageError,
)
from zero_ckpt.retry import GaveUp, RetryPolicy

__all__ = [
    "Location",
    "open_location",
    "FileWriter",
    "prepare_destination",
    "check_distinct",
    "read_capped",
    "list_pending_uploads",
    "abort_pending_uploads",
    "PendingUpload",
]


def open_location(url: str, storage_options: dict[str, Any] | None = None) -> "Location":
    """A checkpoint directory at ``url`` (local path, ``file://``, ``memory://``, ``s3://``...)."""
    return Location(url, storage_options)


class Location:
    """A directory at an fsspec URL. Thread-safe: executors call it from worker threads.

    Paths given to methods are relative to the directory (``"shards/rank-00000-of-00008..."``).
    Close it (or use ``with``) to release cached local file descriptors.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        if not isinstance(url, str) or not url:
            raise CheckpointError(f"checkpoint location must be a non-empty URL string, got {url!r}")
        self.url = url.rstrip("/") if len(url) > 1 else url
        self.storage_options = dict(storage_options or {})
        self.retry = RetryPolicy.from_knobs()
        self._s3: _S3Dir | None = None
        protocol, _ = fsspec.core.split_protocol(self.url)
        try:
            if protocol in _S3_PROTOCOLS:
                self.fs = _s3_filesystem(self.storage_options)
                self.root = self.fs._strip_protocol(self.url)
            else:
                self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except (ImportError, ValueError, TypeError) as exc:
            raise StorageError(f"{url}: cannot open this location ({exc})", path=url) from None
        self.root = self.root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # Remote backends other than S3 (gcs, azure, http, ...) get their calls retried on
        # connection errors; local disk and memory:// have no transient errors to retry.
        self._remote = not self.is_local and not isinstance(self.fs, MemoryFileSystem)
        if protocol in _S3_PROTOCOLS:
            self._s3 = _S3Dir(self.fs, self.root, self.url, self.retry)
        # Read descriptors, pooled: at most knobs.open_files() idle ones stay open (least
        # recently used closed first), so a checkpoint of any number of shards reads under the
        # default ``ulimit -n 1024``. An entry is [fd, users, closing].
        self._fds: OrderedDict[str, list] = OrderedDict()
        self._max_fds = knobs.open_files()
        self._lock = threading.Lock()

    # ----- naming ---------------------------------------------------------------------------

    def url_of(self, rel: str) -> str:
        """Full URL of a file inside the directory, for messages."""
        return f"{self.url}/{rel}" if rel else self.url

    def path_of(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def canonical_root(self) -> str:
        """The directory as one spelling: symlinks, ``.`` and ``..`` resolved on local disk,
        normalised elsewhere; used to tell whether two locations overlap."""
        if self.is_local:
            return os.path.realpath(self.root)
        spelled = self.fs.unstrip_protocol(posixpath.normpath(self.root))
        if self._s3 is not None and self.fs.endpoint_url:
            # The same bucket name on two S3 endpoints is two different places.
            spelled = f"{self.fs.endpoint_url.rstrip('/')}#{spelled}"
        return spelled

    # ----- queries --------------------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        """Whether a file or a non-empty directory is at ``rel`` (on object stores a directory
        is a key prefix: it exists while something is stored under it)."""
        if self._s3 is not None:
            return self._s3.exists(rel, self.url_of(rel))
        try:
            return bool(self._call(lambda: self.fs.exists(self.path_of(rel))))
        except OSError as exc:
            raise self._error(exc, rel, "check") from None

    def size(self, rel: str) -> int:
        """Size in bytes; MissingShardError naming the URL if the file is not there
        (NotRegularFileError for a directory, FIFO, device or socket on local disk)."""
        if self._s3 is not None:
            return self._s3.size(rel, self.url_of(rel))
        if self.is_local:
            return self._stat_regular(rel).st_size
        try:
            return int(self._call(lambda: self.fs.size(self.path_of(rel))))
        except FileNotFoundError:
            raise MissingShardError(f"{self.url_of(rel)} is missing", path=self.url_of(rel)) from None
        except OSError as exc:
            raise self._error(exc, rel, "stat") from None

    def list_files(self) -> list[str]:
        """Every file under the directory, as relative paths (empty if it does not exist)."""
        if self._s3 is not None:
            return self._s3.list_files(self.url)
        try:
            if not self._call(lambda: self.fs.exists(self.root)):
                return []
            found = self._call(lambda: self.fs.find(self.root))
        except OSError as exc:
            raise self._error(exc, "", "list") from None
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)

    # ----- reads ----------------------------------------------------------------------------

    def read_bytes(self, rel: str, max_bytes: int | None = None) -> bytes:
        """The whole file. With ``max_bytes``, a larger file is refused (CorruptShardError
        naming it) before anything is read: what a reader of an untrusted small file
        (``manifest.json``, ``latest``) must use."""
        if max_bytes is not None:
            if self.is_local:
                return self._read_whole_local(rel, max_bytes)
            # One ranged GET of at most max_bytes + 1 bytes (no separate size request: `list`
            # reads one manifest per checkpoint): more than max_bytes back means too large.
            data = self._read_range_remote(rel, 0, max_bytes + 1)
            if len(data) > max_bytes:
                raise CorruptShardError(
                    f"{self.url_of(rel)} is more than {max_bytes} bytes, more than such a file "
                    "can be; it is damaged or not what it should be",
                    path=self.url_of(rel),
                )
            return data
        if self.is_local:
            return self._read_whole_local(rel, None)
        if self._s3 is not None:
            return self._s3.get(rel, self.url_of(rel))
        try:
            return self._call(lambda: self.fs.cat_file(self.path_of(rel)))
        except FileNotFoundError:
            raise MissingShardError(f"{self.url_of(rel)} is missing", path=self.url_of(rel)) from None
        except OSError as exc:
            raise self._error(exc, rel, "read") from None

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file; fewer only if the file is shorter."""
        if self.is_local:
            entry = self._acquire_fd(rel)
            try:
                # Never allocate past the end of the file: a damaged length field must not
                # become a huge buffer.
                size = os.fstat(entry[0]).st_size
                buf = bytearray(max(0, min(end, size) - start))
                got = self._pread_fd(entry[0], start, memoryview(buf))
            finally:
                self._release_fd(entry)
            return bytes(buf[:got])
        return self._read_range_remote(rel, start, end)

    def _read_range_remote(self, rel: str, start: int, end: int) -> bytes:
        if self._s3 is not None:
            return self._s3.get(rel, self.url_of(rel), start, end)
        try:
            return self._call(lambda: self.fs.cat_file(self.path_of(rel), start=start, end=end))
        except FileNotFoundError:
            raise MissingShardError(f"{self.url_of(rel)} is missing", path=self.url_of(rel)) from None
        except OSError as exc:
            raise self._error(exc, rel, "read") from None

    def read_into(self, rel: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the file's bytes from ``offset``; CorruptShardError if too short.

        On S3 this is exactly one ranged GET (retried whole on a transient error), with no
        caching or read-ahead: callers read disjoint ranges from many threads at once.
        """
        if self.is_local:
            got = self._pread(rel, offset, view)
        else:
            data = self.read_range(rel, offset, offset + len(view))
            got = len(data)
            view[:got] = data
        if got != len(view):
            raise CorruptShardError(
                f"{self.url_of(rel)} ends at byte {offset + got}, but bytes up to "
                f"{offset + len(view)} are needed: the file is truncated",
                path=self.url_of(rel),
                expected=offset + len(view),
                actual=offset + got,
            )

    def _read_whole_local(self, rel: str, max_bytes: int | None) -> bytes:
        # A fresh descriptor, not the pool's: small files such as manifest.json are replaced
        # by rename, and a pooled descriptor would still read the old one.
        fd = self._open_regular(rel)
        try:
            size = os.fstat(fd).st_size
            if max_bytes is not None and size > max_bytes:
                raise CorruptShardError(
                    f"{self.url_of(rel)} is {size} bytes, more than the {max_bytes} such a file "
                    "can be; it is damaged or not what it should be",
                    path=self.url_of(rel),
                )
            buf = bytearray(size)
            got = self._pread_fd(fd, 0, memoryview(buf))
        except OSError as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise self._error(exc, rel, "read") from None
        finally:
            os.close(fd)
        return bytes(buf[:got])

    def _pread(self, rel: str, offset: int, view: memoryview) -> int:
        # One shared descriptor per file: os.preadv carries its own offset, so threads need
        # no seek and no lock around reads.
        entry = self._acquire_fd(rel)
        try:
            return self._pread_fd(entry[0], offset, view)
        finally:
            self._release_fd(entry)

    @staticmethod
    def _pread_fd(fd: int, offset: int, view: memoryview) -> int:
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                break
            got += n
        return got

    def _stat_regular(self, rel: str) -> os.stat_result:
        """``stat`` of a local file that must be a regular one (followed through symlinks):
        a FIFO, device, socket or directory is refused before anything opens it, since
        opening or reading one can block forever or never end."""
        try:
            st = os.stat(self.path_of(rel))
        except FileNotFoundError:
            raise MissingShardError(f"{self.url_of(rel)} is missing", path=self.url_of(rel)) from None
        except OSError as exc:
            raise self._error(exc, rel, "stat") from None
        _require_regular(st, self.url_of(rel))
        return st

    def _open_regular(self, rel: str) -> int:
        self._stat_regular(rel)
        try:
            # O_NONBLOCK: should a FIFO be swapped in after the stat, open does not wait for
            # a writer; fstat then refuses it.
            fd = os.open(self.path_of(rel), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise MissingShardError(f"{self.url_of(rel)} is missing", path=self.url_of(rel)) from None
        except OSError as exc:
            raise self._error(exc, rel, "open") from None
        try:
            _require_regular(os.fstat(fd), self.url_of(rel))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _acquire_fd(self, rel: str) -> list:
        """A pooled read descriptor entry ``[fd, users, closing]``; pair with _release_fd."""
        with self._lock:
            entry = self._fds.get(rel)
            if entry is not None:
                entry[1] += 1
                self._fds.move_to_end(rel)
                return entry
        fd = self._open_regular(rel)
        with self._lock:
            entry = self._fds.get(rel)
            if entry is not None:  # another thread opened it meanwhile
                entry[1] += 1
                os.close(fd)
                return entry
            entry = self._fds[rel] = [fd, 1, False]
            self._evict_locked()
            return entry

    def _release_fd(self, entry: list) -> None:
        with self._lock:
            entry[1] -= 1
            if entry[1] == 0 and entry[2]:
                os.close(entry[0])
            else:
                self._evict_locked()

    def _evict_locked(self) -> None:
        if len(self._fds) <= self._max_fds:
            return
        for rel in [r for r, e in self._fds.items() if e[1] == 0]:
            os.close(self._fds.pop(rel)[0])
            if len(self._fds) <= self._max_fds:
                return

    # ----- writes ---------------------------------------------------------------------------

    def writer(self, rel: str, size: int | None = None, *, part_bytes: int | None = None) -> "FileWriter":
        """A writer for a new file at ``rel``, visible only after ``commit()``.

        ``size`` (bytes), when known, lets local and S3 writers accept positioned writes from
        several threads (:meth:`FileWriter.write_at`). ``part_bytes``: S3 multipart part size
        (default: the ZERO_CKPT_S3_PART_BYTES knob); ignored elsewhere.
        """
        return FileWriter(self, rel, size, part_bytes=part_bytes)

    def write_buffer_bytes(self, workers: int, part_bytes: int | None = None) -> int:
        """Most bytes this location's writers hold at once when ``workers`` threads fill files
        with the transfer engine: S3 multipart part buffers ``(2 workers + 1 + uploads) x
        part`` (see :class:`_S3Upload`); 0 elsewhere (local files are written in place)."""
        if self._s3 is None:
            return 0
        part = max(part_bytes or knobs.s3_part_bytes(), knobs.s3_min_part_bytes())
        return (2 * workers + 1 + knobs.s3_uploads()) * part

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write a small file so that readers see either nothing or all of it (the commit)."""
        with self.writer(rel, len(data)) as w:
            w.write(data)

    def makedirs(self, rel: str = "") -> None:
        if self._s3 is not None:
            self._s3.make_marker(rel, self.url_of(rel))
            return
        try:
            self._call(lambda: self.fs.makedirs(self.path_of(rel), exist_ok=True))
        except OSError as exc:
            raise self._error(exc, rel, "create") from None

    def remove(self, rel: str) -> None:
        """Delete a file; a missing file is fine."""
        self._forget_fd(rel)
        if self._s3 is not None:
            self._s3.delete(rel, self.url_of(rel))
            return
        try:
            self._call(lambda: self.fs.rm_file(self.path_of(rel)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, rel, "delete") from None

    def remove_all(self) -> None:
        """Delete the directory's contents (used for ``--overwrite``)."""
        self.close()
        if self._s3 is not None:
            self._s3.delete_all(self.url)
            return
        try:
            if self._call(lambda: self.fs.exists(self.root)):
                self._call(lambda: self.fs.rm(self.root, recursive=True))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, "", "delete") from None

    # ----- housekeeping ---------------------------------------------------------------------

    def _forget_fd(self, rel: str) -> None:
        with self._lock:
            entry = self._fds.pop(rel, None)
            if entry is not None:
                if entry[1]:
                    entry[2] = True  # its last user closes it
                else:
                    os.close(entry[0])

    def close(self) -> None:
        with self._lock:
            entries, self._fds = list(self._fds.values()), OrderedDict()
            for entry in entries:
                if entry[1]:
                    entry[2] = True
                else:
                    os.close(entry[0])

    def __enter__(self) -> "Location":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on a remote fsspec backend, retried on connection errors (not S3: see
        :class:`_S3Dir`); the last error is re-raised as it was for :meth:`_error`."""
        if not self._remote:
            return fn()
        try:
            return self.retry.call(fn, _is_connection_error)
        except GaveUp as gave_up:
            raise gave_up.last from None

    def _error(self, exc: OSError, rel: str, action: str) -> CheckpointError:
        url = self.url_of(rel)
        if isinstance(exc, FileNotFoundError):
            return MissingShardError(f"{url} is missing", path=url)
        if isinstance(exc, PermissionError):
            return StorageError(f"cannot {action} {url}: permission denied", path=url)
        if getattr(exc, "errno", None) == errno.ENOSPC:
            return StorageError(f"cannot {action} {url}: no space left on device", path=url)
        return StorageError(f"cannot {action} {url}: {exc}", path=url)


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _require_regular(st: os.stat_result, url: str) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
    raise NotRegularFileError(
        f"{url} is {kind}, not a regular file; a checkpoint's files must be regular files "
        "(replace it with the real file)",
        path=url,
    )


def read_capped(loc: Location, rel: str, max_bytes: int) -> bytes:
    """The whole of a small file at ``loc/rel`` (``latest``, ``manifest.json``, a job record),
    refused with a CheckpointError naming it when it is larger than ``max_bytes`` or not a
    regular file, before any memory is spent on it."""
    return loc.read_bytes(rel, max_bytes=max_bytes)


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload started under a location and neither completed nor aborted: S3
    keeps (and bills) its parts until it is aborted. ``key`` is relative to the location;
    ``initiated`` is the server's ISO 8601 time."""

    key: str
    upload_id: str
    initiated: str


def list_pending_uploads(url: str, storage_options: dict[str, Any] | None = None) -> list[PendingUpload]:
    """Pending multipart uploads under ``url`` (S3 only: [] for other backends, which have
    none), oldest first. A job that fails aborts its own; a killed process cannot, and these
    are what it left. ``abort_pending_uploads`` (or a bucket lifecycle rule) removes them."""
    with open_location(url, storage_options) as loc:
        if loc._s3 is None:
            return []
        return loc._s3.pending_uploads(loc.url)


def abort_pending_uploads(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Abort every pending multipart upload under ``url``; returns how many (S3 only)."""
    with open_location(url, storage_options) as loc:
        if loc._s3 is None:
            return 0
        pending = loc._s3.pending_uploads(loc.url)
        for up in pending:
            key = loc._s3.key(up.key)
            loc._s3.call(
                loc.url_of(up.key), "abort",
                lambda key=key, uid=up.upload_id: loc._s3._s3("abort_multipart_upload", Key=key, UploadId=uid),
                accept=_has_code("NoSuchUpload"),
            )
        return len(pending)


def check_distinct(src: Location, dst: Location) -> None:
    """Refuse a destination that is the source, lies inside it or contains it (however
    spelled: symlinks and ``..`` resolved), since writing there could destroy the source."""
    if type(src.fs) is type(dst.fs):
        s, d = src.canonical_root(), dst.canonical_root()
        if s == d or s.startswith(d.rstrip("/") + "/") or d.startswith(s.rstrip("/") + "/"):
            raise DestinationExistsError(
                f"destination {dst.url} is the source, inside it or contains it; choose a "
                "destination outside the source checkpoint",
                path=dst.url,
            )


def prepare_destination(
    src: Location | None,
    dst: Location,
    overwrite: bool,
    *,
    outputs: Any = (),
    folders: Any = ("shards",),
) -> None:
    """Make ``dst`` ready for a new checkpoint or output set, owning only what zero-ckpt writes.

    Refuses a destination that is the source, inside it or contains it; one holding files
    zero-ckpt writes (``manifest.json``, shards, ``model*.safetensors`` ..., or ``outputs``)
    unless ``overwrite``; and a file it does not write inside one of ``folders``. With
    ``overwrite`` exactly those zero-ckpt files go, the commit points (``manifest.json``,
    indexes) first, so a crash midway never leaves a stale "complete" one; every other file
    stays. See :mod:`zero_ckpt.destination` for the rules and the claim marker.
    """
    from zero_ckpt.destination import prepare_output  # it builds on this module

    prepare_output(
        dst, overwrite, outputs=outputs, folders=tuple(folders),
        sources=(src,) if src is not None else (),
    )


class FileWriter:
    """Writes one new file; ``commit()`` makes it visible, ``abort()`` leaves no trace.

    Sequential ``write()`` works on every backend. ``write_at()`` (positioned, thread-safe)
    works on local disk and S3 when the size was given: workers fill disjoint ranges in
    parallel. Used as a context manager it commits on success and aborts on an exception.
    """

    def __init__(self, location: Location, rel: str, size: int | None, *, part_bytes: int | None = None) -> None:
        self.location = location
        self.rel = rel
        self.url = location.url_of(rel)
        self.size = size
        self.bytes_written = 0
        self._closed = False
        self._upload: _S3Upload | None = None
        self._stream: Any = None
        self._fd = -1
        path = location.path_of(rel)
        try:
            if location.is_local:
                parent = os.path.dirname(path)
                os.makedirs(parent, exist_ok=True)
                # Temporary sibling + rename: a reader never sees a half-written file under
                # the final name, and a crash leaves only an obviously temporary file.
                self._tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
                self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                if size:
                    os.ftruncate(self._fd, size)
                self._final = path
            elif location._s3 is not None:
                # S3: one PUT on commit for files up to a part, else a multipart upload whose
                # parts go up as they fill; the object appears only on commit.
                self._upload = _S3Upload(location._s3, rel, self.url, size, part_bytes)
            elif isinstance(location.fs, MemoryFileSystem):
                # fsspec's memory filesystem publishes a file as soon as it is opened and
                # cannot discard it: stage the bytes here and publish them whole on commit.
                self._stream = _StagedFile(location.fs, path)
            else:
                # Other object stores: the object appears only when the upload completes,
                # and discard() aborts the multipart upload.
                self._stream = location.fs.open(path, "wb")
        except OSError as exc:
            raise location._error(exc, rel, "create") from None

    def write(self, data) -> int:
        """Append bytes (sequential use only); returns their CRC32C."""
        crc = crc32c(data)
        n = len(data)
        try:
            if self._upload is not None:
                self._upload.write_at(self.bytes_written, data)
            elif self._stream is not None:
                self._stream.write(data)
            else:
                self._pwrite_all(data, self.bytes_written)
        except OSError as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise self.location._error(exc, self.rel, "write") from None
        self.bytes_written += n
        return crc

    def write_at(self, offset: int, data) -> None:
        """Write bytes at ``offset``; local and S3 files of known size only. Thread-safe."""
        if not self.supports_write_at:
            if self._upload is not None:
                raise RuntimeError("write_at needs an S3 writer opened with a known size")
            raise RuntimeError("write_at needs a local file opened with a known size")
        if self._upload is not None:
            self._upload.write_at(offset, data)
            return
        try:
            self._pwrite_all(data, offset)
        except OSError as exc:
            raise self.location._error(exc, self.rel, "write") from None

    def _pwrite_all(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    @property
    def part_bytes(self) -> int | None:
        """S3 multipart part size of this file (None elsewhere): positioned writes that keep
        segment boundaries on multiples of it never share a part between two workers."""
        return self._upload.part if self._upload is not None else None

    @property
    def supports_write_at(self) -> bool:
        if self.size is None:
            return False
        return self._upload is not None or (self._stream is None and self._fd >= 0)

    def commit(self, fsync: bool | None = None) -> None:
        """Make the file visible under its final name (after fsync on local disk, unless
        ``fsync`` is False; None means the ZERO_CKPT_FSYNC knob, on by default)."""
        if self._closed:
            return
        if fsync is None:
            fsync = knobs.fsync()
        self._closed = True
        try:
            if self._upload is not None:
                self._upload.commit()
            elif self._stream is not None:
                self._stream.close()
            else:
                if fsync:
                    os.fsync(self._fd)
                os.close(self._fd)
                os.replace(self._tmp, self._final)
                if fsync:
                    _fsync_dir(os.path.dirname(self._final))
        except CheckpointError:
            self._cleanup_quietly()
            raise
        except OSError as exc:
            self._cleanup_quietly()
            raise self.location._error(exc, self.rel, "commit") from None
        except BaseException:
            self._cleanup_quietly()
            raise

    def abort(self) -> None:
        """Drop the file: nothing remains under the final name or the temporary one (on S3:
        no object and no pending multipart upload)."""
        if self._closed:
            return
        self._closed = True
        self._cleanup_quietly()

    def _cleanup_quietly(self) -> None:
        if self._upload is not None:
            self._upload.abort()
            return
        if self._stream is not None:
            try:
                # fsspec's buffered writers upload on close; discard instead where offered.
                if hasattr(self._stream, "discard"):
                    self._stream.discard()
                else:
                    self._stream.close()
                    self.location.fs.rm_file(self.location.path_of(self.rel))
            except Exception:  # noqa: BLE001 - best effort on an already failing path
                pass
            return
        try:
            os.close(self._fd)
        except OSError:
            pass
        try:
            os.unlink(self._tmp)
        except OSError:
            pass

    def __enter__(self) -> "FileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class _StagedFile:
    """A write stream kept in memory and published in one ``pipe_file`` on close."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def close(self) -> None:
        self.fs.pipe_file(self.path, b"".join(self.parts))
        self.parts = []

    def discard(self) -> None:
        self.parts = []


def _fsync_dir(path: str) -> None:
    # The rename is durable only once the directory entry is: fsync the directory too.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----- S3 ---------------------------------------------------------------------------------------
#
# Why direct calls on s3fs's client rather than the filesystem's file API:
# - s3fs's listings cache answers ``exists``/``ls`` from earlier listings, so a file another
#   process (or this one, through another path) wrote or deleted can look absent or present;
#   a checkpoint's commit point is one object, so every query here goes to the server.
# - reads must be exactly one ranged GET per call (s3fs files read ahead and cache blocks);
# - positioned multipart writes (several threads filling one object) are not in s3fs's API;
# - retries must be bounded and counted in one place (below), not multiplied by s3fs's and
#   botocore's own loops.
# s3fs still builds the client from the storage options exactly as users expect, and applies
# the user's ``s3_additional_kwargs``/``requester_pays`` to every request (``_S3Dir._s3``).

_S3_PROTOCOLS = ("s3", "s3a")
_S3_MAX_PARTS = 10_000
# botocore's bucket rule (names AWS no longer issues, e.g. upper case, are still valid for old
# buckets and other S3 servers); access point ARNs are passed through.
_S3_BUCKET = re.compile(r"^(?:[a-zA-Z0-9.\-_]{1,255}|arn:.+)$")
_S3_FILESYSTEMS: dict[str, Any] = {}
_S3_FILESYSTEMS_LOCK = threading.Lock()


def _s3_filesystem(options: dict[str, Any]) -> Any:
    """An ``s3fs.S3FileSystem`` for these storage options, private to zero-ckpt.

    Options flow to s3fs unchanged (``endpoint_url``, ``anon``, ``key``/``secret``/``token``,
    ``profile``, ``client_kwargs={"region_name": ...}``, ``config_kwargs``, ...); credentials,
    region and endpoint not given come from the usual AWS environment variables and profiles.

    One change: this module retries every call itself (bounded, with backoff and jitter, see
    :mod:`zero_ckpt.retry`) and bypasses s3fs's retry wrapper (``_S3Dir._s3``), so botocore is
    told to try once: ``config_kwargs["retries"] = {"total_max_attempts": 1}`` unless the
    caller set retries (then the attempts multiply but stay bounded). Without that one failing
    request could be sent 5 (ours) x 5 (botocore's legacy mode) times; s3fs would add 5 more
    rounds of its own. (aiohttp still resends an idempotent request once when the kept-alive
    connection it reused turns out closed: at most 2 requests per attempt.) Because the instance
    is configured differently it is not taken from (nor left in) fsspec's shared instance
    cache, where a user's own ``fsspec.filesystem("s3", ...)`` with the same options would meet
    it; it is cached here instead, keyed by the options, the AWS_* environment (so a changed
    endpoint or profile variable takes effect) and the process id (clients do not survive
    ``fork``).
    """
    import s3fs  # heavy (aiobotocore): only when an s3:// URL is used

    key = json.dumps(
        [os.getpid(), sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")), options],
        sort_keys=True,
        default=repr,
    )
    with _S3_FILESYSTEMS_LOCK:
        fs = _S3_FILESYSTEMS.get(key)
        if fs is None:
            opts = dict(options)
            config = dict(opts.get("config_kwargs") or {})
            config.setdefault("retries", {"total_max_attempts": 1})
            opts["config_kwargs"] = config
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
            if len(_S3_FILESYSTEMS) >= 64:  # bounded; a dropped instance closes with its last user
                _S3_FILESYSTEMS.pop(next(iter(_S3_FILESYSTEMS)))
            _S3_FILESYSTEMS[key] = fs
        return fs


def _client_error(exc: BaseException) -> Any:
    """The botocore ClientError behind ``exc`` (also through s3fs, which turns them into
    OSError subclasses and keeps the original as ``__cause__``), or None."""
    from botocore.exceptions import ClientError

    for e in (exc, exc.__cause__):
        if isinstance(e, ClientError):
            return e
    return None


def _s3_status(exc: BaseException) -> tuple[int | None, str | None, str]:
    """``(HTTP status, S3 error code, message)`` of a failed request; Nones if no answer came."""
    ce = _client_error(exc)
    if ce is None:
        return None, None, ""
    response = getattr(ce, "response", None) or {}
    err = response.get("Error") or {}
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return status, err.get("Code"), err.get("Message") or ""


# Codes S3 (and S3-compatible servers) answer when trying again later can succeed.
_S3_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
    "TooManyRequestsException", "RequestLimitExceeded", "RequestTimeout", "InternalError",
    "ServiceUnavailable", "503", "500",
    # the body was damaged in transit (s3fs retries these too)
    "XAmzContentSHA256Mismatch", "BadDigest", "IncompleteBody",
})
_S3_PERMISSION_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem", "403",
})


def _is_connection_error(exc: BaseException) -> bool:
    """A request that got no complete answer: reset, refused, timed out, cut off mid-body."""
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError, socket.timeout)):
        return True
    from fsspec.exceptions import FSTimeoutError

    if isinstance(exc, FSTimeoutError):
        return True
    try:
        import botocore.exceptions as bex
        from botocore.parsers import ResponseParserError
    except ImportError:  # pragma: no cover - s3fs depends on botocore
        pass
    else:
        # HTTPClientError covers ConnectionClosedError, ReadTimeoutError, ResponseStreamingError;
        # a throttling answer can arrive as unparsable XML (s3fs issue 484).
        if isinstance(exc, (bex.HTTPClientError, bex.ConnectionError, bex.IncompleteReadError,
                            ResponseParserError)):
            return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return False
    # ClientPayloadError (body cut short), ServerDisconnectedError, ClientConnectionError, ...
    return isinstance(exc, aiohttp.ClientError)


def _is_transient(exc: BaseException) -> bool:
    """Worth another attempt: no answer, a 5xx, 429 or a throttling/timeout code."""
    status, code, _ = _s3_status(exc)
    if status is not None or code is not None:
        return (status is not None and (status >= 500 or status == 429)) or code in _S3_TRANSIENT_CODES
    return _is_connection_error(exc)


def _is_missing(exc: BaseException) -> bool:
    status, code, _ = _s3_status(exc)
    return code != "NoSuchBucket" and (status == 404 or code in ("NoSuchKey", "NotFound", "404"))


def _has_code(*codes: str) -> Callable[[BaseException], bool]:
    return lambda exc: _s3_status(exc)[1] in codes


class _Accepted:
    """What :meth:`_S3Dir.call` returns instead of raising an error the caller expects."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _S3Dir:
    """A directory (bucket + key prefix) on S3: every call one request, retried if transient.

    Thread-safe: callers in worker threads block on fsspec's event loop thread, where the
    requests of all threads run concurrently.
    """

    def __init__(self, fs: Any, root: str, url: str, retry: RetryPolicy) -> None:
        self.fs = fs
        # s3fs's split knows access point ARNs, whose "bucket" contains slashes.
        self.bucket, prefix, _ = fs.split_path(root)
        self.prefix = prefix.strip("/")
        self.retry = retry
        if not self.bucket or not _S3_BUCKET.match(self.bucket):
            raise StorageError(
                f"{url}: {self.bucket!r} is not a valid S3 bucket name (expected "
                "s3://BUCKET/PATH)",
                path=url,
            )
        # Part uploads in flight for all writers of this directory (back-pressure: memory).
        self.upload_slots = threading.BoundedSemaphore(knobs.s3_uploads())

    def key(self, rel: str) -> str:
        return posixpath.join(self.prefix, rel) if self.prefix and rel else (rel or self.prefix)

    async def _s3(self, method: str, **kwargs: Any) -> Any:
        """One request, no retry. This is ``fs._call_s3`` without s3fs's retry wrapper (which
        sleeps after a throttling answer even when it will not try again, and turns errors into
        OSErrors): the user's ``s3_additional_kwargs`` and ``requester_pays`` still apply."""
        await self.fs.set_session()
        client = await self.fs.get_s3(self.bucket)
        call = getattr(client, method)
        return await call(**self.fs._get_s3_method_kwargs(call, Bucket=self.bucket, **kwargs))

    def call(
        self,
        url: str,
        action: str,
        make: Callable[[], Awaitable[Any]],
        accept: Callable[[BaseException], bool] | None = None,
        is_transient: Callable[[BaseException], bool] = _is_transient,
    ) -> Any:
        """Run ``make()`` (a fresh coroutine per attempt) on fsspec's loop, retried while
        transient. An error ``accept`` recognises comes back as :class:`_Accepted`; any other
        becomes a CheckpointError naming ``url``."""
        from fsspec.asyn import sync

        try:
            return sync(self.fs.loop, self.retry.acall, make, is_transient)
        except GaveUp as gave_up:
            if accept is not None and accept(gave_up.last):
                return _Accepted(gave_up.last)
            raise self.failure(gave_up, url, action) from None

    def failure(self, gave_up: GaveUp, url: str, action: str) -> CheckpointError:
        """The one-sentence error for a call that failed for good."""
        exc = gave_up.last
        status, code, message = _s3_status(exc)
        if code == "NoSuchBucket":
            return StorageError(
                f"cannot {action} {url}: bucket {self.bucket!r} does not exist (check the URL, "
                "the endpoint and the credentials' account)",
                path=url,
            )
        if _is_missing(exc):
            return MissingShardError(f"{url} is missing", path=url)
        if status == 403 or code in _S3_PERMISSION_CODES:
            return StorageError(
                f"cannot {action} {url}: permission denied ({code or status}: check the "
                "credentials and the bucket policy)",
                path=url,
            )
        import botocore.exceptions as bex

        if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
            return StorageError(
                f"cannot {action} {url}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or pass the storage option anon=true "
                "for a public bucket)",
                path=url,
            )
        if isinstance(exc, bex.ParamValidationError):
            detail = " ".join(str(exc).split("\n")[1:2]).split(": Bucket name must")[0]
            return StorageError(f"cannot {action} {url}: invalid request ({detail.strip()})", path=url)
        if status is not None or code is not None:
            # HEAD answers have no body: their "code" is the status again.
            label = f"HTTP {status}" if code in (None, str(status)) else f"HTTP {status} {code}"
            what = f"{label}: {message}" if message else label
        else:
            what = f"{type(exc).__name__}: {str(exc)[:300]}"
        if gave_up.transient:
            what += (
                f" (still failing after {gave_up.attempts} attempts; transient errors are retried "
                "up to ZERO_CKPT_RETRIES times with backoff)"
            )
        return StorageError(f"cannot {action} {url}: {what}", path=url)

    # ----- queries ---------------------------------------------------------------------------

    def head(self, rel: str, url: str, action: str = "stat") -> dict | None:
        """The object's metadata, or None if there is no such object."""
        key = self.key(rel)
        res = self.call(url, action, lambda: self._s3("head_object", Key=key), accept=_is_missing)
        return None if isinstance(res, _Accepted) else res

    def exists(self, rel: str, url: str) -> bool:
        key = self.key(rel)
        if not key:  # the bucket itself
            res = self.call(url, "check", lambda: self._s3("head_bucket"), accept=lambda e: _s3_status(e)[0] == 404)
            return not isinstance(res, _Accepted)
        if self.head(rel, url, "check") is not None:
            return True
        # A "directory": any object under the prefix.
        res = self.call(url, "check", lambda: self._s3("list_objects_v2", Prefix=key + "/", MaxKeys=1))
        return bool(res.get("KeyCount") or res.get("Contents"))

    def make_marker(self, rel: str, url: str) -> None:
        """Make an empty directory visible: S3 has no directories, a prefix exists while
        something is stored under it, so write the empty ``prefix/`` marker object the S3
        console and most tools use. ``list_files`` skips markers; ``delete_all`` removes them."""
        key = self.key(rel)
        if key:
            self.call(url, "create", lambda: self._s3("put_object", Key=key + "/", Body=b""))
        elif not self.exists(rel, url):  # the bucket itself
            raise StorageError(
                f"cannot create {url}: bucket {self.bucket!r} does not exist (create it first; "
                "zero-ckpt does not create buckets)",
                path=url,
            )

    def size(self, rel: str, url: str) -> int:
        info = self.head(rel, url)
        if info is None:
            raise MissingShardError(f"{url} is missing", path=url)
        return int(info["ContentLength"])

    def list_keys(self, url: str) -> list[str]:
        """Every key under the directory (one request per 1,000 keys, each retried)."""
        prefix = self.prefix + "/" if self.prefix else ""
        keys: list[str] = []
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self.call(url, "list", lambda: self._s3("list_objects_v2", Prefix=prefix, **extra))
            keys += [c["Key"] for c in page.get("Contents", [])]
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return keys

    def list_files(self, url: str) -> list[str]:
        n = len(self.prefix) + 1 if self.prefix else 0
        # Keys ending in "/" are directory markers some tools write: not files.
        return sorted(k[n:] for k in self.list_keys(url) if not k.endswith("/"))

    # ----- reads -----------------------------------------------------------------------------

    def get(self, rel: str, url: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object, or its bytes ``[start, end)`` (fewer at the end of the object): one GET."""
        key = self.key(rel)
        extra = {}
        if start is not None:
            if end is not None and end <= start:
                return b""
            extra["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))

        async def attempt() -> bytes:
            resp = await self._s3("get_object", Key=key, **extra)
            try:
                return await resp["Body"].read()
            finally:
                resp["Body"].close()

        # A range that starts at or past the end is answered 416 InvalidRange: no bytes.
        res = self.call(url, "read", attempt, accept=_has_code("InvalidRange") if extra else None)
        return b"" if isinstance(res, _Accepted) else res

    # ----- writes ----------------------------------------------------------------------------

    def put(self, rel: str, url: str, data: Any) -> None:
        key = self.key(rel)
        self.call(url, "write", lambda: self._s3("put_object", Key=key, Body=data))

    def delete(self, rel: str, url: str) -> None:
        """Delete an object; a missing one is fine (S3 answers 204 either way)."""
        key = self.key(rel)
        self.call(url, "delete", lambda: self._s3("delete_object", Key=key), accept=_is_missing)

    def delete_all(self, url: str) -> None:
        keys = self.list_keys(url)
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            res = self.call(url, "delete", lambda batch=batch: self._s3("delete_objects", Delete=batch))
            errors = res.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"cannot delete {url}: {len(errors)} object(s) not deleted, e.g. "
                    f"s3://{self.bucket}/{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip(),
                    path=url,
                )

    def pending_uploads(self, url: str) -> list[PendingUpload]:
        """Every pending multipart upload under the directory (one request per 1,000)."""
        prefix = self.prefix + "/" if self.prefix else ""
        out: list[PendingUpload] = []
        marker: dict[str, str] = {}
        while True:
            page = self.call(
                url, "list", lambda marker=dict(marker): self._s3("list_multipart_uploads", Prefix=prefix, **marker)
            )
            for up in page.get("Uploads", []) or []:
                initiated = up.get("Initiated")
                out.append(PendingUpload(
                    up["Key"][len(prefix):], up["UploadId"],
                    initiated.isoformat() if hasattr(initiated, "isoformat") else str(initiated or ""),
                ))
            if not page.get("IsTruncated"):
                break
            marker = {"KeyMarker": page.get("NextKeyMarker") or "",
                      "UploadIdMarker": page.get("NextUploadIdMarker") or ""}
        return sorted(out, key=lambda u: (u.initiated, u.key))

    def abort_uploads_for(self, key: str, url: str, keep: str | None) -> None:
        """Abort every pending multipart upload of exactly ``key`` but ``keep`` (best effort)."""
        try:
            res = self.call(url, "abort", lambda: self._s3("list_multipart_uploads", Prefix=key))
            for upload in res.get("Uploads", []):
                if upload.get("Key") == key and upload.get("UploadId") != keep:
                    uid = upload["UploadId"]
                    self.call(url, "abort",
                              lambda uid=uid: self._s3("abort_multipart_upload", Key=key, UploadId=uid),
                              accept=_has_code("NoSuchUpload"))
        except CheckpointError:
            pass


class _S3Upload:
    """One object being written: a single PUT on commit, or a multipart upload.

    Size known (``size`` bytes): the object is cut into parts of ``part`` bytes (the last one
    shorter). ``write_at`` copies bytes into the buffer of the part they fall in, allocated on
    first touch, and counts the bytes each part has; the write that completes a part hands it
    to an upload running on fsspec's event loop and the buffer is freed when it is sent. Files
    of one part or less are kept whole and PUT on commit. Size unknown: sequential writes only,
    parts uploaded as they fill, the last one on commit.

    Memory, for the transfer engine (``W`` workers, each filling a contiguous segment in order,
    segments handed out in file order): a part is held while partly filled or uploading. A
    worker has one part it is filling; a part straddling two segments can also wait for the
    other segment's worker; at the frontier one more; so at most ``2 W + 1`` parts are being
    filled across all files, plus at most ZERO_CKPT_S3_UPLOADS parts uploading per location
    (writers wait for a slot when all are busy: back-pressure that cannot deadlock, as uploads
    never wait on writers). Bound: ``(2 W + 1 + uploads) x part`` bytes (8 MiB parts, 4
    workers, 4 uploads: 104 MiB at worst; about ``(W + uploads) x part`` in practice).

    Commit waits for every part, then completes the upload with the parts in order. Abort stops
    the retries of uploads in flight, waits until none runs, then aborts the multipart upload:
    S3 keeps neither an object nor parts. A CreateMultipartUpload whose answer was lost (the
    create was retried) may have started an upload whose id nobody knows; then commit and
    abort also abort every other pending upload of this exact key (destinations are
    exclusive). Uploads abandoned by a killed process are S3's to expire: give the bucket a
    lifecycle rule
    ``AbortIncompleteMultipartUpload``.
    """

    def __init__(self, d: _S3Dir, rel: str, url: str, size: int | None, part_bytes: int | None) -> None:
        if size is not None and size < 0:
            raise ValueError(f"file size must not be negative, got {size}")
        self.d = d
        self.rel = rel
        self.key = d.key(rel)
        self.url = url
        self.size = size
        part = max(part_bytes or knobs.s3_part_bytes(), knobs.s3_min_part_bytes())
        if size is not None and math.ceil(size / part) > _S3_MAX_PARTS:
            part = math.ceil(size / _S3_MAX_PARTS / (1 << 20)) << 20  # S3 allows 10,000 parts
        self.part = part
        self.single = size is not None and size <= part
        self._cond = threading.Condition()
        self._buffers: dict[int, bytearray] = {}
        self._filled: dict[int, int] = {}
        self._sent: set[int] = set()  # parts handed to an upload
        self._etags: dict[int, str] = {}
        self._inflight = 0
        self._error: GaveUp | None = None
        self._upload_id: str | None = None
        self._create_lock = threading.Lock()
        self._ambiguous_create = False
        self._closed = False

    @property
    def parts(self) -> int | None:
        return None if self.size is None else max(1, math.ceil(self.size / self.part))

    def _part_len(self, p: int) -> int:
        if self.size is None:
            return self.part
        return min(self.part, self.size - p * self.part)

    # ----- filling ---------------------------------------------------------------------------

    def write_at(self, offset: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        n = len(view)
        if offset < 0 or (self.size is not None and offset + n > self.size):
            raise ValueError(
                f"write of {n} bytes at {offset} is outside {self.url}'s {self.size} bytes"
            )
        self._raise_if_failed()
        pos, done = offset, 0
        while done < n:
            p = pos // self.part
            start = p * self.part
            plen = self._part_len(p)
            k = min(n - done, start + plen - pos)
            with self._cond:
                if self._closed:
                    raise RuntimeError(f"write to {self.url} after commit or abort")
                buf = self._buffers.get(p)
                if buf is None:
                    if p in self._sent:
                        raise RuntimeError(f"bytes of part {p + 1} of {self.url} written twice")
                    buf = self._buffers[p] = bytearray(plen)
                    self._filled[p] = 0
            # Disjoint ranges of one buffer: no lock needed for the copy itself.
            buf[pos - start : pos - start + k] = view[done : done + k]
            with self._cond:
                self._filled[p] += k
                if self._filled[p] > plen:
                    raise RuntimeError(f"overlapping writes to part {p + 1} of {self.url}")
                full = self._filled[p] == plen and not self.single
                if full:
                    del self._buffers[p], self._filled[p]
                    self._sent.add(p)
            if full:
                self._send(p, buf)
            pos += k
            done += k

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self.d.failure(self._error, self.url, "upload")

    def _ensure_upload(self) -> str:
        with self._create_lock:
            if self._upload_id is None:

                def transient(exc: BaseException) -> bool:
                    if _is_transient(exc):
                        self._ambiguous_create = True  # it may have reached the server
                        return True
                    return False

                res = self.d.call(self.url, "upload",
                                  lambda: self.d._s3("create_multipart_upload", Key=self.key),
                                  is_transient=transient)
                self._upload_id = res["UploadId"]
            return self._upload_id

    def _send(self, p: int, buf: bytearray) -> None:
        """Upload part ``p`` in the background; waits while the location's slots are busy."""
        upload_id = self._ensure_upload()
        self.d.upload_slots.acquire()
        with self._cond:
            self._inflight += 1
        try:
            asyncio.run_coroutine_threadsafe(self._upload_part(upload_id, p, buf), self.d.fs.loop)
        except BaseException:
            self._part_done()
            raise

    async def _upload_part(self, upload_id: str, p: int, buf: bytearray) -> None:
        # Never cancelled (a task cancelled before it starts would skip this finally and leave
        # the count of uploads in flight wrong): after abort() it just stops retrying.
        def transient(exc: BaseException) -> bool:
            return not self._closed and _is_transient(exc)

        try:
            res = await self.d.retry.acall(
                lambda: self.d._s3("upload_part", Key=self.key, UploadId=upload_id,
                                   PartNumber=p + 1, Body=buf),
                transient,
            )
            with self._cond:
                self._etags[p] = res["ETag"]
        except GaveUp as gave_up:
            with self._cond:
                if self._error is None:
                    self._error = gave_up
        finally:
            self._part_done()

    def _part_done(self) -> None:
        self.d.upload_slots.release()
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def _wait_uploads(self) -> None:
        # Bounded by the retry policy and botocore's timeouts; the timeout here only guards
        # against a loop that no longer runs (interpreter shutdown).
        with self._cond:
            self._cond.wait_for(lambda: self._inflight == 0, timeout=600)

    # ----- ending ----------------------------------------------------------------------------

    def commit(self) -> None:
        try:
            self._commit()
        except BaseException:
            self.abort()
            raise
        finally:
            with self._cond:
                self._closed = True
        if self._ambiguous_create:
            self.d.abort_uploads_for(self.key, self.url, keep=None)

    def _commit(self) -> None:
        with self._cond:
            if self._closed:
                return
            multipart = bool(self._sent)
            if self.size is None and not multipart:
                buf = self._buffers.pop(0, bytearray())
                written = self._filled.pop(0, 0)
                data = memoryview(buf)[:written]
            elif not multipart:
                written = sum(self._filled.values())
                data = self._buffers.pop(0, bytearray())
        if not multipart:
            if self.size is not None and written != self.size:
                raise StorageError(
                    f"cannot commit {self.url}: {written} of its {self.size} bytes were written",
                    path=self.url,
                )
            self.d.put(self.rel, self.url, bytes(data))
            return
        if self.size is None:  # the last, partial part
            with self._cond:
                last = max(self._buffers, default=None)
                if last is not None:
                    buf = self._buffers.pop(last)
                    filled = self._filled.pop(last)
                    self._sent.add(last)
            if last is not None and filled:
                self._send(last, buf[:filled])
        self._wait_uploads()
        self._raise_if_failed()
        with self._cond:
            etags = dict(self._etags)
        count = self.parts if self.size is not None else len(etags)
        if sorted(etags) != list(range(count)):
            missing = self.size - sum(self._part_len(p) for p in etags) if self.size is not None else 0
            raise StorageError(
                f"cannot commit {self.url}: {missing} of its {self.size} bytes were never written",
                path=self.url,
            )
        parts = [{"PartNumber": p + 1, "ETag": etags[p]} for p in range(count)]
        upload_id = self._upload_id
        res = self.d.call(
            self.url, "commit",
            lambda: self.d._s3("complete_multipart_upload", Key=self.key, UploadId=upload_id,
                               MultipartUpload={"Parts": parts}),
            accept=_has_code("NoSuchUpload"),
        )
        if isinstance(res, _Accepted):
            # An earlier attempt may have completed it and lost the answer: the object is
            # there if its ETag is the multipart ETag of exactly these parts.
            info = self.d.head(self.rel, self.url, "commit")
            if info is None or not _is_multipart_etag_of(info.get("ETag", ""), [etags[p] for p in range(count)]):
                raise StorageError(
                    f"cannot commit {self.url}: its multipart upload is gone (aborted by another "
                    "process or a bucket lifecycle rule?); write the file again",
                    path=self.url,
                )
        self._upload_id = None

    def abort(self) -> None:
        with self._cond:
            already = self._closed and self._upload_id is None
            self._closed = True  # uploads in flight finish their current attempt, no retry
            self._buffers.clear()
            self._filled.clear()
        if already:
            return
        self._wait_uploads()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            try:
                self.d.call(self.url, "abort",
                            lambda: self.d._s3("abort_multipart_upload", Key=self.key, UploadId=upload_id),
                            accept=_has_code("NoSuchUpload"))
            except CheckpointError:
                pass  # best effort on an already failing path; S3 lifecycle rules are the net
        if self._ambiguous_create:
            self.d.abort_uploads_for(self.key, self.url, keep=None)


def _is_multipart_etag_of(etag: str, part_etags: list[str]) -> bool:
    """Whether ``etag`` is S3's ETag of a multipart object made of parts with these ETags
    (``md5(concatenated part MD5s)-N``); when part ETags are not MD5s (SSE-KMS), the part
    count is all that can be checked."""
    etag = etag.strip('"')
    n = len(part_etags)
    if not etag.endswith(f"-{n}"):
        return False
    try:
        digests = b"".join(bytes.fromhex(e.strip('"')) for e in part_etags)
    except ValueError:
        return True
    if len(digests) != 16 * n:
        return True
    return etag == f"{md5(digests).hexdigest()}-{n}"
