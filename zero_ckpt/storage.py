"""Storage over fsspec: a checkpoint directory at any URL, ranged reads, writes, atomic commit.

Every backend quirk lives here, commented with the why. URLs stay ``str`` end to end
(``pathlib.Path`` would turn ``s3://bucket`` into ``s3:/bucket``). Errors become
``CheckpointError`` subclasses naming the URL of the file concerned.

Writes are never visible under their final name until complete: on local disk a file is
written to a temporary sibling, fsynced and renamed into place; on object stores an object
appears only when its upload finishes. A checkpoint's commit point is ``manifest.json``,
written last by :meth:`Location.write_atomic`.
"""

from __future__ import annotations

import errno
import os
import posixpath
import threading
import uuid
from typing import Any

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
    StorageError,
)

__all__ = ["Location", "open_location", "FileWriter", "prepare_destination"]


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
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"{url}: cannot open this location ({exc})", path=url) from None
        self.root = self.root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._fds: dict[str, int] = {}
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
        return self.fs.unstrip_protocol(posixpath.normpath(self.root))

    # ----- queries --------------------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        try:
            return bool(self.fs.exists(self.path_of(rel)))
        except OSError as exc:
            raise self._error(exc, rel, "check") from None

    def size(self, rel: str) -> int:
        """Size in bytes; MissingShardError naming the URL if the file is not there."""
        try:
            return int(self.fs.size(self.path_of(rel)))
        except FileNotFoundError:
            raise MissingShardError(f"{self.url_of(rel)} is missing", path=self.url_of(rel)) from None
        except OSError as exc:
            raise self._error(exc, rel, "stat") from None

    def list_files(self) -> list[str]:
        """Every file under the directory, as relative paths (empty if it does not exist)."""
        try:
            if not self.fs.exists(self.root):
                return []
            found = self.fs.find(self.root)
        except OSError as exc:
            raise self._error(exc, "", "list") from None
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)

    # ----- reads ----------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path_of(rel))
        except FileNotFoundError:
            raise MissingShardError(f"{self.url_of(rel)} is missing", path=self.url_of(rel)) from None
        except OSError as exc:
            raise self._error(exc, rel, "read") from None

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file; fewer only if the file is shorter."""
        if self.is_local:
            buf = bytearray(end - start)
            got = self._pread(rel, start, memoryview(buf))
            return bytes(buf[:got])
        try:
            return self.fs.cat_file(self.path_of(rel), start=start, end=end)
        except FileNotFoundError:
            raise MissingShardError(f"{self.url_of(rel)} is missing", path=self.url_of(rel)) from None
        except OSError as exc:
            raise self._error(exc, rel, "read") from None

    def read_into(self, rel: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the file's bytes from ``offset``; CorruptShardError if too short."""
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

    def _pread(self, rel: str, offset: int, view: memoryview) -> int:
        # One shared descriptor per file: os.preadv carries its own offset, so threads need
        # no seek and no lock around reads.
        fd = self._fd(rel)
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                break
            got += n
        return got

    def _fd(self, rel: str) -> int:
        with self._lock:
            fd = self._fds.get(rel)
            if fd is None:
                try:
                    fd = os.open(self.path_of(rel), os.O_RDONLY)
                except FileNotFoundError:
                    raise MissingShardError(
                        f"{self.url_of(rel)} is missing", path=self.url_of(rel)
                    ) from None
                except OSError as exc:
                    raise self._error(exc, rel, "open") from None
                self._fds[rel] = fd
            return fd

    # ----- writes ---------------------------------------------------------------------------

    def writer(self, rel: str, size: int | None = None) -> "FileWriter":
        """A writer for a new file at ``rel``, visible only after ``commit()``.

        ``size`` (bytes), when known, lets local writers preallocate and accept positioned
        writes from several threads (:meth:`FileWriter.write_at`).
        """
        return FileWriter(self, rel, size)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write a small file so that readers see either nothing or all of it (the commit)."""
        with self.writer(rel, len(data)) as w:
            w.write(data)

    def makedirs(self, rel: str = "") -> None:
        try:
            self.fs.makedirs(self.path_of(rel), exist_ok=True)
        except OSError as exc:
            raise self._error(exc, rel, "create") from None

    def remove(self, rel: str) -> None:
        """Delete a file; a missing file is fine."""
        self._forget_fd(rel)
        try:
            self.fs.rm_file(self.path_of(rel))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, rel, "delete") from None

    def remove_all(self) -> None:
        """Delete the directory's contents (used for ``--overwrite``)."""
        self.close()
        try:
            if self.fs.exists(self.root):
                self.fs.rm(self.root, recursive=True)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, "", "delete") from None

    # ----- housekeeping ---------------------------------------------------------------------

    def _forget_fd(self, rel: str) -> None:
        with self._lock:
            fd = self._fds.pop(rel, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> "Location":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, exc: OSError, rel: str, action: str) -> CheckpointError:
        url = self.url_of(rel)
        if isinstance(exc, FileNotFoundError):
            return MissingShardError(f"{url} is missing", path=url)
        if isinstance(exc, PermissionError):
            return StorageError(f"cannot {action} {url}: permission denied", path=url)
        if getattr(exc, "errno", None) == errno.ENOSPC:
            return StorageError(f"cannot {action} {url}: no space left on device", path=url)
        return StorageError(f"cannot {action} {url}: {exc}", path=url)


def prepare_destination(src: Location | None, dst: Location, overwrite: bool) -> None:
    """Make ``dst`` ready for a new checkpoint or output set.

    Refuses a destination that is the source or contains it, and a non-empty one unless
    ``overwrite``; with ``overwrite`` the old ``manifest.json`` goes first, so a crash
    midway leaves something recognisably incomplete rather than a stale "complete" one.
    """
    if src is not None and type(src.fs) is type(dst.fs):
        s, d = src.canonical_root(), dst.canonical_root()
        if s == d or s.startswith(d.rstrip("/") + "/") or d.startswith(s.rstrip("/") + "/"):
            raise DestinationExistsError(
                f"destination {dst.url} is the source, inside it or contains it; choose a "
                "destination outside the source checkpoint",
                path=dst.url,
            )
    if dst.list_files():
        if not overwrite:
            raise DestinationExistsError(
                f"destination {dst.url} already exists and is not empty; choose a new path or "
                "pass --overwrite (overwrite=True) to replace it",
                path=dst.url,
            )
        dst.remove("manifest.json")
        dst.remove_all()
    dst.makedirs()


class FileWriter:
    """Writes one new file; ``commit()`` makes it visible, ``abort()`` leaves no trace.

    Sequential ``write()`` works on every backend. ``write_at()`` (positioned, thread-safe)
    works on local disk when the size was given: workers fill disjoint ranges in parallel.
    Used as a context manager it commits on success and aborts on an exception.
    """

    def __init__(self, location: Location, rel: str, size: int | None) -> None:
        self.location = location
        self.rel = rel
        self.url = location.url_of(rel)
        self.size = size
        self.bytes_written = 0
        self._closed = False
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
                self._stream = None
            elif isinstance(location.fs, MemoryFileSystem):
                # fsspec's memory filesystem publishes a file as soon as it is opened and
                # cannot discard it: stage the bytes here and publish them whole on commit.
                self._stream = _StagedFile(location.fs, path)
                self._fd = -1
            else:
                # Object stores: the object appears only when the upload completes, and
                # discard() aborts the multipart upload.
                self._stream = location.fs.open(path, "wb")
                self._fd = -1
        except OSError as exc:
            raise location._error(exc, rel, "create") from None

    def write(self, data) -> int:
        """Append bytes (sequential use only); returns their CRC32C."""
        crc = crc32c(data)
        n = len(data)
        try:
            if self._stream is not None:
                self._stream.write(data)
            else:
                self._pwrite_all(data, self.bytes_written)
        except OSError as exc:
            raise self.location._error(exc, self.rel, "write") from None
        self.bytes_written += n
        return crc

    def write_at(self, offset: int, data) -> None:
        """Write bytes at ``offset``; local files of known size only. Thread-safe."""
        if self._stream is not None or self.size is None:
            raise RuntimeError("write_at needs a local file opened with a known size")
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
    def supports_write_at(self) -> bool:
        return self._stream is None and self.size is not None

    def commit(self, fsync: bool | None = None) -> None:
        """Make the file visible under its final name (after fsync on local disk, unless
        ``fsync`` is False; None means the ZERO_CKPT_FSYNC knob, on by default)."""
        if self._closed:
            return
        if fsync is None:
            fsync = knobs.fsync()
        self._closed = True
        try:
            if self._stream is not None:
                self._stream.close()
            else:
                if fsync:
                    os.fsync(self._fd)
                os.close(self._fd)
                os.replace(self._tmp, self._final)
                if fsync:
                    _fsync_dir(os.path.dirname(self._final))
        except OSError as exc:
            self._cleanup_quietly()
            raise self.location._error(exc, self.rel, "commit") from None
        except BaseException:
            self._cleanup_quietly()
            raise

    def abort(self) -> None:
        """Drop the file: nothing remains under the final name or the temporary one."""
        if self._closed:
            return
        self._closed = True
        self._cleanup_quietly()

    def _cleanup_quietly(self) -> None:
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
