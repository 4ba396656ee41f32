"""The small interface every storage backend implements, and what they share.

A :class:`~zero_ckpt.storage.Location` holds one :class:`Backend`, chosen once when it is
opened (:func:`zero_ckpt.storage.open_location`), and delegates to it: local POSIX disk
(:mod:`.local`), S3 through s3fs's client (:mod:`.s3`) and any other fsspec filesystem
(:mod:`.fsspec_backend`). Paths given to a backend are relative to its directory; every error
a backend raises is a :class:`~zero_ckpt.errors.CheckpointError` naming the URL of the file
concerned, except where a method says otherwise.

A writer is a :class:`WriteHandle`: the backend's half of a
:class:`~zero_ckpt.storage.FileWriter`, which keeps the bookkeeping (bytes written, CRC,
commit-once) and turns raw ``OSError`` into the project's errors.
"""

from __future__ import annotations

import errno
import posixpath
from abc import ABC, abstractmethod
from typing import Any

from zero_ckpt.errors import CheckpointError, CorruptShardError, MissingShardError, StorageError
from zero_ckpt.retry import RetryPolicy

__all__ = ["Backend", "WriteHandle", "os_error"]


def os_error(exc: OSError, url: str, action: str) -> CheckpointError:
    """The one-sentence CheckpointError for an ``OSError`` met while ``action``-ing ``url``."""
    if isinstance(exc, FileNotFoundError):
        return MissingShardError(f"{url} is missing", path=url)
    if isinstance(exc, PermissionError):
        return StorageError(f"cannot {action} {url}: permission denied", path=url)
    if getattr(exc, "errno", None) == errno.ENOSPC:
        return StorageError(f"cannot {action} {url}: no space left on device", path=url)
    return StorageError(f"cannot {action} {url}: {exc}", path=url)


class WriteHandle(ABC):
    """One new file being written; invisible under its final name until :meth:`commit`.

    Methods may raise raw ``OSError``: the FileWriter around it names the file.
    """

    #: Whether :meth:`write_at` works (given a known size): several threads filling
    #: disjoint ranges.
    positioned: bool = False
    #: What ``write_at`` needs, for the message when it is refused.
    write_at_needs: str = "a local file"
    #: Object-store part size (None where there are no parts).
    part_bytes: int | None = None

    @abstractmethod
    def write(self, offset: int, data: Any) -> None:
        """Append ``data``; ``offset`` is the number of bytes written before it."""

    def write_at(self, offset: int, data: Any) -> None:
        """Write ``data`` at ``offset`` (thread-safe); only where :attr:`positioned`."""
        raise RuntimeError(f"write_at needs {self.write_at_needs} opened with a known size")

    @abstractmethod
    def commit(self, fsync: bool) -> None:
        """Publish the file under its final name (durably first on local disk if ``fsync``)."""

    @abstractmethod
    def discard(self) -> None:
        """Drop the file, quietly and best effort: nothing is left of it."""


class Backend(ABC):
    """A directory on one kind of storage. Thread-safe: executors call it from worker threads.

    ``fs`` is the fsspec filesystem, ``root`` the directory's path on it, ``url`` its URL as
    given (for messages).
    """

    #: Whether writers of known size accept positioned writes from several threads.
    supports_positioned_write: bool = False
    #: Whether :meth:`put_conditional` is available (compare-and-swap on one file).
    supports_conditional_put: bool = False

    def __init__(self, fs: Any, root: str, url: str, retry: RetryPolicy) -> None:
        self.fs = fs
        self.root = root
        self.url = url
        self.retry = retry

    # ----- naming ---------------------------------------------------------------------------

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def path_of(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def local_path(self, rel: str = "") -> str | None:
        """The OS path of ``rel`` where the storage is the local file system, else None."""
        return None

    def canonical_root(self) -> str:
        """The directory as one spelling (see :meth:`Location.canonical_root`)."""
        return self.fs.unstrip_protocol(posixpath.normpath(self.root))

    def error(self, exc: OSError, rel: str, action: str) -> CheckpointError:
        return os_error(exc, self.url_of(rel), action)

    # ----- queries --------------------------------------------------------------------------

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    def is_file(self, rel: str) -> bool:
        """Whether a file is at ``rel``, as the filesystem's public ``isfile`` says."""
        try:
            return bool(self.fs.isfile(self.path_of(rel)))
        except OSError as exc:
            raise self.error(exc, rel, "check") from None

    def is_dir(self, rel: str) -> bool:
        """Whether a directory is at ``rel``, as the filesystem's public ``isdir`` says."""
        try:
            return bool(self.fs.isdir(self.path_of(rel)))
        except OSError as exc:
            raise self.error(exc, rel, "check") from None

    @abstractmethod
    def size(self, rel: str) -> int: ...

    @abstractmethod
    def list_files(self) -> list[str]: ...

    # ----- reads ----------------------------------------------------------------------------

    @abstractmethod
    def read_whole(self, rel: str) -> bytes: ...

    @abstractmethod
    def read_range(self, rel: str, start: int, end: int) -> bytes: ...

    def read_bytes(self, rel: str, max_bytes: int | None) -> bytes:
        if max_bytes is None:
            return self.read_whole(rel)
        # One ranged GET of at most max_bytes + 1 bytes (no separate size request: `list`
        # reads one manifest per checkpoint): more than max_bytes back means too large.
        data = self.read_range(rel, 0, max_bytes + 1)
        if len(data) > max_bytes:
            raise CorruptShardError(
                f"{self.url_of(rel)} is more than {max_bytes} bytes, more than such a file "
                "can be; it is damaged or not what it should be",
                path=self.url_of(rel),
            )
        return data

    def read_into(self, rel: str, offset: int, view: memoryview) -> int:
        """Fill ``view`` from ``offset``; returns how many bytes there were (fewer at the end)."""
        data = self.read_range(rel, offset, offset + len(view))
        got = len(data)
        view[:got] = data
        return got

    # ----- writes ---------------------------------------------------------------------------

    @abstractmethod
    def open_writer(self, rel: str, size: int | None, part_bytes: int | None) -> WriteHandle:
        """A handle for a new file at ``rel``; raw OSError if it cannot be created."""

    def write_buffer_bytes(self, workers: int, part_bytes: int | None) -> int:
        """Most bytes writers hold at once with ``workers`` threads (0: written in place)."""
        return 0

    @abstractmethod
    def makedirs(self, rel: str) -> None: ...

    @abstractmethod
    def remove(self, rel: str) -> None: ...

    @abstractmethod
    def remove_all(self) -> None: ...

    def put_conditional(self, rel: str, data: bytes, *, if_none_match: bool = False,
                        if_match: str | None = None) -> bool:
        raise NotImplementedError(f"{self.url}: conditional writes are not supported here")

    def etag(self, rel: str) -> str | None:
        raise NotImplementedError(f"{self.url}: entity tags are not supported here")

    # ----- object-store housekeeping ----------------------------------------------------------

    def pending_uploads(self) -> list[Any]:
        """Multipart uploads started and neither completed nor aborted (none here)."""
        return []

    def abort_pending_uploads(self) -> int:
        return 0

    def close(self) -> None:
        """Release cached resources (local read descriptors)."""
