"""Local POSIX disk: positioned reads through a bounded descriptor pool, regular files only,
writes to a temporary sibling renamed into place after fsync.

Queries, listings and deletions go through fsspec's LocalFileSystem (:class:`FsspecBackend`);
reads and writes use the OS directly.
"""

from __future__ import annotations

import os
import stat
import threading
import uuid
from collections import OrderedDict
from typing import Any

from zero_ckpt import knobs
from zero_ckpt.errors import CheckpointError, CorruptShardError, MissingShardError, NotRegularFileError
from zero_ckpt.retry import RetryPolicy
from zero_ckpt.storage.backend import WriteHandle
from zero_ckpt.storage.fsspec_backend import FsspecBackend

__all__ = ["LocalBackend"]


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


def _pread_fd(fd: int, offset: int, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


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


class LocalBackend(FsspecBackend):
    """A directory on local disk (fsspec's LocalFileSystem for queries)."""

    remote = False
    supports_positioned_write = True

    def __init__(self, fs: Any, root: str, url: str, retry: RetryPolicy) -> None:
        super().__init__(fs, root, url, retry)
        # Read descriptors, pooled: at most knobs.open_files() idle ones stay open (least
        # recently used closed first), so a checkpoint of any number of shards reads under the
        # default ``ulimit -n 1024``. An entry is [fd, users, closing].
        self._fds: OrderedDict[str, list] = OrderedDict()
        self._max_fds = knobs.open_files()
        self._lock = threading.Lock()

    def local_path(self, rel: str = "") -> str | None:
        return self.path_of(rel)

    def canonical_root(self) -> str:
        return os.path.realpath(self.root)

    # ----- queries --------------------------------------------------------------------------

    def size(self, rel: str) -> int:
        return self._stat_regular(rel).st_size

    # ----- reads ----------------------------------------------------------------------------

    def read_bytes(self, rel: str, max_bytes: int | None) -> bytes:
        return self._read_whole_local(rel, max_bytes)

    def read_whole(self, rel: str) -> bytes:
        return self._read_whole_local(rel, None)

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        entry = self._acquire_fd(rel)
        try:
            # Never allocate past the end of the file: a damaged length field must not
            # become a huge buffer.
            size = os.fstat(entry[0]).st_size
            buf = bytearray(max(0, min(end, size) - start))
            got = _pread_fd(entry[0], start, memoryview(buf))
        finally:
            self._release_fd(entry)
        return bytes(buf[:got])

    def read_into(self, rel: str, offset: int, view: memoryview) -> int:
        # One shared descriptor per file: os.preadv carries its own offset, so threads need
        # no seek and no lock around reads.
        entry = self._acquire_fd(rel)
        try:
            return _pread_fd(entry[0], offset, view)
        finally:
            self._release_fd(entry)

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
            got = _pread_fd(fd, 0, memoryview(buf))
        except OSError as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise self.error(exc, rel, "read") from None
        finally:
            os.close(fd)
        return bytes(buf[:got])

    def _stat_regular(self, rel: str) -> os.stat_result:
        """``stat`` of a local file that must be a regular one (followed through symlinks):
        a FIFO, device, socket or directory is refused before anything opens it, since
        opening or reading one can block forever or never end."""
        try:
            st = os.stat(self.path_of(rel))
        except FileNotFoundError:
            raise MissingShardError(f"{self.url_of(rel)} is missing", path=self.url_of(rel)) from None
        except OSError as exc:
            raise self.error(exc, rel, "stat") from None
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
            raise self.error(exc, rel, "open") from None
        try:
            _require_regular(os.fstat(fd), self.url_of(rel))
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ----- the descriptor pool ----------------------------------------------------------------

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

    # ----- writes ---------------------------------------------------------------------------

    def open_writer(self, rel: str, size: int | None, part_bytes: int | None) -> WriteHandle:
        return _LocalHandle(self.path_of(rel), size)

    def remove(self, rel: str) -> None:
        self._forget_fd(rel)
        super().remove(rel)


class _LocalHandle(WriteHandle):
    """A temporary sibling filled with pwrite, fsynced and renamed into place on commit."""

    positioned = True

    def __init__(self, path: str, size: int | None) -> None:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        # Temporary sibling + rename: a reader never sees a half-written file under the final
        # name, and a crash leaves only an obviously temporary file.
        self._tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if size:
            os.ftruncate(self._fd, size)
        self._final = path

    def write(self, offset: int, data: Any) -> None:
        self.write_at(offset, data)

    def write_at(self, offset: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def commit(self, fsync: bool) -> None:
        if fsync:
            os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self._tmp, self._final)
        if fsync:
            _fsync_dir(os.path.dirname(self._final))

    def discard(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        try:
            os.unlink(self._tmp)
        except OSError:
            pass
