"""Any fsspec filesystem (gcs, azure, http, ``memory://``, ...) through its public API.

Remote backends get their calls retried on connection errors (:mod:`zero_ckpt.retry`); local
disk and ``memory://`` have no transient errors to retry. S3 has its own backend
(:mod:`.s3`) and local disk its own (:mod:`.local`), which builds on this one.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable

from zero_ckpt.errors import MissingShardError
from zero_ckpt.retry import GaveUp
from zero_ckpt.storage.backend import Backend, WriteHandle

__all__ = ["FsspecBackend", "MemoryBackend"]


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


class FsspecBackend(Backend):
    """A directory on an fsspec filesystem; every call through the filesystem's public API."""

    #: Whether calls are retried on connection errors (not for local disk or memory).
    remote = True

    def _call(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried on connection errors where remote; the last error is re-raised as
        it was, for :meth:`error`."""
        if not self.remote:
            return fn()
        try:
            return self.retry.call(fn, _is_connection_error)
        except GaveUp as gave_up:
            raise gave_up.last from None

    # ----- queries --------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        try:
            return bool(self._call(lambda: self.fs.exists(self.path_of(rel))))
        except OSError as exc:
            raise self.error(exc, rel, "check") from None

    def size(self, rel: str) -> int:
        try:
            return int(self._call(lambda: self.fs.size(self.path_of(rel))))
        except FileNotFoundError:
            raise MissingShardError(f"{self.url_of(rel)} is missing", path=self.url_of(rel)) from None
        except OSError as exc:
            raise self.error(exc, rel, "stat") from None

    def list_files(self) -> list[str]:
        try:
            if not self._call(lambda: self.fs.exists(self.root)):
                return []
            found = self._call(lambda: self.fs.find(self.root))
        except OSError as exc:
            raise self.error(exc, "", "list") from None
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)

    # ----- reads ----------------------------------------------------------------------------

    def read_whole(self, rel: str) -> bytes:
        try:
            return self._call(lambda: self.fs.cat_file(self.path_of(rel)))
        except FileNotFoundError:
            raise MissingShardError(f"{self.url_of(rel)} is missing", path=self.url_of(rel)) from None
        except OSError as exc:
            raise self.error(exc, rel, "read") from None

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        try:
            return self._call(lambda: self.fs.cat_file(self.path_of(rel), start=start, end=end))
        except FileNotFoundError:
            raise MissingShardError(f"{self.url_of(rel)} is missing", path=self.url_of(rel)) from None
        except OSError as exc:
            raise self.error(exc, rel, "read") from None

    # ----- writes ---------------------------------------------------------------------------

    def open_writer(self, rel: str, size: int | None, part_bytes: int | None) -> WriteHandle:
        # Object stores: the object appears only when the upload completes, and discard()
        # aborts the multipart upload.
        path = self.path_of(rel)
        return _StreamHandle(self.fs, path, self.fs.open(path, "wb"))

    def makedirs(self, rel: str) -> None:
        try:
            self._call(lambda: self.fs.makedirs(self.path_of(rel), exist_ok=True))
        except OSError as exc:
            raise self.error(exc, rel, "create") from None

    def remove(self, rel: str) -> None:
        try:
            self._call(lambda: self.fs.rm_file(self.path_of(rel)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self.error(exc, rel, "delete") from None

    def remove_all(self) -> None:
        try:
            if self._call(lambda: self.fs.exists(self.root)):
                self._call(lambda: self.fs.rm(self.root, recursive=True))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self.error(exc, "", "delete") from None


class MemoryBackend(FsspecBackend):
    """fsspec's ``memory://`` filesystem: no transient errors, writes staged until commit."""

    remote = False

    def open_writer(self, rel: str, size: int | None, part_bytes: int | None) -> WriteHandle:
        # fsspec's memory filesystem publishes a file as soon as it is opened and cannot
        # discard it: stage the bytes here and publish them whole on commit.
        path = self.path_of(rel)
        return _StreamHandle(self.fs, path, _StagedFile(self.fs, path))


class _StreamHandle(WriteHandle):
    """A sequential fsspec write stream: published on close, dropped by ``discard``."""

    def __init__(self, fs: Any, path: str, stream: Any) -> None:
        self.fs, self.path, self.stream = fs, path, stream

    def write(self, offset: int, data: Any) -> None:
        self.stream.write(data)

    def commit(self, fsync: bool) -> None:
        self.stream.close()

    def discard(self) -> None:
        try:
            # fsspec's buffered writers upload on close; discard instead where offered.
            if hasattr(self.stream, "discard"):
                self.stream.discard()
            else:
                self.stream.close()
                self.fs.rm_file(self.path)
        except Exception:  # noqa: BLE001 - best effort on an already failing path
            pass


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
