"""A checkpoint directory at a URL (:class:`Location`) and its file writer (:class:`FileWriter`).

A Location picks its backend once, when it is opened, and delegates every call to it; the
backends (:mod:`.local`, :mod:`.s3`, :mod:`.fsspec_backend`) hold every quirk of their storage.
"""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from zero_ckpt import knobs
from zero_ckpt.checksum import crc32c
from zero_ckpt.errors import CheckpointError, CorruptShardError, DestinationExistsError, StorageError
from zero_ckpt.retry import RetryPolicy
from zero_ckpt.storage.backend import Backend, WriteHandle
from zero_ckpt.storage.fsspec_backend import FsspecBackend, MemoryBackend
from zero_ckpt.storage.local import LocalBackend
from zero_ckpt.storage.s3 import S3_PROTOCOLS, PendingUpload, S3Backend, _S3Upload, open_s3

__all__ = [
    "Location",
    "open_location",
    "FileWriter",
    "check_distinct",
    "read_capped",
    "list_pending_uploads",
    "abort_pending_uploads",
]


def open_location(url: str, storage_options: dict[str, Any] | None = None) -> "Location":
    """A checkpoint directory at ``url`` (local path, ``file://``, ``memory://``, ``s3://``...)."""
    return Location(url, storage_options)


def _open_backend(url: str, options: dict[str, Any], retry: RetryPolicy) -> Backend:
    """The backend for ``url``: chosen here once, never again by the Location."""
    protocol, _ = fsspec.core.split_protocol(url)
    try:
        if protocol in S3_PROTOCOLS:
            return open_s3(url, options, retry)
        fs, root = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError, TypeError) as exc:
        raise StorageError(f"{url}: cannot open this location ({exc})", path=url) from None
    root = root.rstrip("/") or "/"
    if isinstance(fs, LocalFileSystem):
        return LocalBackend(fs, root, url, retry)
    if isinstance(fs, MemoryFileSystem):
        return MemoryBackend(fs, root, url, retry)
    return FsspecBackend(fs, root, url, retry)


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
        self._backend = _open_backend(self.url, self.storage_options, self.retry)
        self.root = self._backend.root

    # ----- naming ---------------------------------------------------------------------------

    def url_of(self, rel: str) -> str:
        """Full URL of a file inside the directory, for messages."""
        return f"{self.url}/{rel}" if rel else self.url

    def path_of(self, rel: str) -> str:
        """The path of ``rel`` on the location's filesystem (no protocol)."""
        return self._backend.path_of(rel)

    def local_path(self, rel: str = "") -> str | None:
        """The OS path of ``rel`` (or of the directory) when the location is on local disk,
        else None: for the few callers that hand a path to another library (``torch.load``
        with mmap) or use OS primitives (locks, ``rmdir`` of emptied folders)."""
        return self._backend.local_path(rel)

    def canonical_root(self) -> str:
        """The directory as one spelling: symlinks, ``.`` and ``..`` resolved on local disk,
        normalised elsewhere; used to tell whether two locations overlap."""
        return self._backend.canonical_root()

    def same_storage_kind(self, other: "Location") -> bool:
        """Whether ``other`` is on the same kind of storage (the same filesystem type), so
        that the two locations' :meth:`canonical_root` spellings can be compared."""
        return type(self._backend.fs) is type(other._backend.fs)

    # ----- capabilities ---------------------------------------------------------------------

    @property
    def supports_positioned_write(self) -> bool:
        """Whether writers of known size accept positioned writes from several threads
        (:meth:`FileWriter.write_at`): local disk and S3."""
        return self._backend.supports_positioned_write

    @property
    def supports_conditional_put(self) -> bool:
        """Whether :meth:`put_conditional` is available (S3)."""
        return self._backend.supports_conditional_put

    # ----- queries --------------------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        """Whether a file or a non-empty directory is at ``rel`` (on object stores a directory
        is a key prefix: it exists while something is stored under it)."""
        return self._backend.exists(rel)

    def is_file(self, rel: str = "") -> bool:
        """Whether a file is at ``rel`` (the directory itself by default), as the filesystem
        says; a failure to tell is a StorageError naming the URL (an ``OSError``)."""
        return self._backend.is_file(rel)

    def is_dir(self, rel: str = "") -> bool:
        """Whether a directory is at ``rel`` (the directory itself by default), as the
        filesystem says; a failure to tell is a StorageError naming the URL (an ``OSError``)."""
        return self._backend.is_dir(rel)

    def size(self, rel: str) -> int:
        """Size in bytes; MissingShardError naming the URL if the file is not there
        (NotRegularFileError for a directory, FIFO, device or socket on local disk)."""
        return self._backend.size(rel)

    def etag(self, rel: str) -> str | None:
        """The object's entity tag, None if there is no such object (where
        :attr:`supports_conditional_put`)."""
        return self._backend.etag(rel)

    def list_files(self) -> list[str]:
        """Every file under the directory, as relative paths (empty if it does not exist)."""
        return self._backend.list_files()

    # ----- reads ----------------------------------------------------------------------------

    def read_bytes(self, rel: str, max_bytes: int | None = None) -> bytes:
        """The whole file. With ``max_bytes``, a larger file is refused (CorruptShardError
        naming it) before anything is read: what a reader of an untrusted small file
        (``manifest.json``, ``latest``) must use."""
        return self._backend.read_bytes(rel, max_bytes)

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file; fewer only if the file is shorter."""
        return self._backend.read_range(rel, start, end)

    def read_into(self, rel: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the file's bytes from ``offset``; CorruptShardError if too short.

        On S3 this is exactly one ranged GET (retried whole on a transient error), with no
        caching or read-ahead: callers read disjoint ranges from many threads at once.
        """
        got = self._backend.read_into(rel, offset, view)
        if got != len(view):
            raise CorruptShardError(
                f"{self.url_of(rel)} ends at byte {offset + got}, but bytes up to "
                f"{offset + len(view)} are needed: the file is truncated",
                path=self.url_of(rel),
                expected=offset + len(view),
                actual=offset + got,
            )

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
        part`` (see :class:`zero_ckpt.storage.s3._S3Upload`); 0 elsewhere (local files are
        written in place)."""
        return self._backend.write_buffer_bytes(workers, part_bytes)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write a small file so that readers see either nothing or all of it (the commit)."""
        with self.writer(rel, len(data)) as w:
            w.write(data)

    def put_conditional(self, rel: str, data: bytes, *, if_none_match: bool = False,
                        if_match: str | None = None) -> bool:
        """Write a small file only if none is there (``if_none_match``) or only over the one
        whose :meth:`etag` is ``if_match``; False when the condition failed. Where
        :attr:`supports_conditional_put` only (S3)."""
        return self._backend.put_conditional(rel, data, if_none_match=if_none_match, if_match=if_match)

    def makedirs(self, rel: str = "") -> None:
        self._backend.makedirs(rel)

    def remove(self, rel: str) -> None:
        """Delete a file; a missing file is fine."""
        self._backend.remove(rel)

    def remove_all(self) -> None:
        """Delete the directory's contents (used for ``--overwrite``)."""
        self.close()
        self._backend.remove_all()

    # ----- object-store housekeeping --------------------------------------------------------

    def pending_uploads(self) -> list[PendingUpload]:
        """Pending multipart uploads under the directory, oldest first ([] off S3)."""
        return self._backend.pending_uploads()

    def abort_pending_uploads(self) -> int:
        """Abort every pending multipart upload under the directory; returns how many."""
        return self._backend.abort_pending_uploads()

    # ----- housekeeping ---------------------------------------------------------------------

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Location":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, exc: OSError, rel: str, action: str) -> CheckpointError:
        return self._backend.error(exc, rel, action)

    # ----- for tests and diagnostics only: library code uses the methods above ---------------

    @property
    def fs(self) -> Any:
        """The fsspec filesystem underneath."""
        return self._backend.fs

    @property
    def is_local(self) -> bool:
        return self._backend.local_path() is not None

    @property
    def _s3(self) -> S3Backend | None:
        return self._backend if isinstance(self._backend, S3Backend) else None

    @property
    def _fds(self) -> Any:
        return getattr(self._backend, "_fds", {})


def read_capped(loc: Location, rel: str, max_bytes: int) -> bytes:
    """The whole of a small file at ``loc/rel`` (``latest``, ``manifest.json``, a job record),
    refused with a CheckpointError naming it when it is larger than ``max_bytes`` or not a
    regular file, before any memory is spent on it."""
    return loc.read_bytes(rel, max_bytes=max_bytes)


def list_pending_uploads(url: str, storage_options: dict[str, Any] | None = None) -> list[PendingUpload]:
    """Pending multipart uploads under ``url`` (S3 only: [] for other backends, which have
    none), oldest first. A job that fails aborts its own; a killed process cannot, and these
    are what it left. ``abort_pending_uploads`` (or a bucket lifecycle rule) removes them."""
    with open_location(url, storage_options) as loc:
        return loc.pending_uploads()


def abort_pending_uploads(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Abort every pending multipart upload under ``url``; returns how many (S3 only)."""
    with open_location(url, storage_options) as loc:
        return loc.abort_pending_uploads()


def check_distinct(src: Location, dst: Location) -> None:
    """Refuse a destination that is the source, lies inside it or contains it (however
    spelled: symlinks and ``..`` resolved), since writing there could destroy the source."""
    if src.same_storage_kind(dst):
        s, d = src.canonical_root(), dst.canonical_root()
        if s == d or s.startswith(d.rstrip("/") + "/") or d.startswith(s.rstrip("/") + "/"):
            raise DestinationExistsError(
                f"destination {dst.url} is the source, inside it or contains it; choose a "
                "destination outside the source checkpoint",
                path=dst.url,
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
        try:
            self._handle: WriteHandle = location._backend.open_writer(rel, size, part_bytes)
        except OSError as exc:
            raise location._error(exc, rel, "create") from None

    @property
    def _upload(self) -> WriteHandle | None:
        """The S3 upload behind this writer (None elsewhere); for tests."""
        return self._handle if isinstance(self._handle, _S3Upload) else None

    def write(self, data) -> int:
        """Append bytes (sequential use only); returns their CRC32C."""
        crc = crc32c(data)
        n = len(data)
        try:
            self._handle.write(self.bytes_written, data)
        except OSError as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise self.location._error(exc, self.rel, "write") from None
        self.bytes_written += n
        return crc

    def write_at(self, offset: int, data) -> None:
        """Write bytes at ``offset``; local and S3 files of known size only. Thread-safe."""
        if not self.supports_write_at:
            raise RuntimeError(f"write_at needs {self._handle.write_at_needs} opened with a known size")
        try:
            self._handle.write_at(offset, data)
        except OSError as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise self.location._error(exc, self.rel, "write") from None

    @property
    def part_bytes(self) -> int | None:
        """S3 multipart part size of this file (None elsewhere): positioned writes that keep
        segment boundaries on multiples of it never share a part between two workers."""
        return self._handle.part_bytes

    @property
    def supports_write_at(self) -> bool:
        return self.size is not None and self._handle.positioned

    def commit(self, fsync: bool | None = None) -> None:
        """Make the file visible under its final name (after fsync on local disk, unless
        ``fsync`` is False; None means the ZERO_CKPT_FSYNC knob, on by default)."""
        if self._closed:
            return
        if fsync is None:
            fsync = knobs.fsync()
        self._closed = True
        try:
            self._handle.commit(fsync)
        except CheckpointError:
            self._handle.discard()
            raise
        except OSError as exc:
            self._handle.discard()
            raise self.location._error(exc, self.rel, "commit") from None
        except BaseException:
            self._handle.discard()
            raise

    def abort(self) -> None:
        """Drop the file: nothing remains under the final name or the temporary one (on S3:
        no object and no pending multipart upload)."""
        if self._closed:
            return
        self._closed = True
        self._handle.discard()

    def __enter__(self) -> "FileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
