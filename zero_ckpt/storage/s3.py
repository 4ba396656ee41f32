"""S3 (``s3://``, ``s3a://``) through s3fs's client: one request per call, every call retried
on transient errors by :class:`zero_ckpt.retry.RetryPolicy`, multipart uploads filled by
positioned writes (:class:`_S3Upload`), S3's answers turned into one-sentence errors.

s3fs (and aiobotocore) is imported only when an ``s3://`` URL is opened.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import posixpath
import re
import threading
from hashlib import md5
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from zero_ckpt import knobs
from zero_ckpt.errors import CheckpointError, MissingShardError, StorageError
from zero_ckpt.retry import GaveUp, RetryPolicy
from zero_ckpt.storage.backend import Backend, WriteHandle
from zero_ckpt.storage.fsspec_backend import _is_connection_error

__all__ = ["S3Backend", "S3_PROTOCOLS", "PendingUpload"]

# Why direct calls on s3fs's client rather than the filesystem's file API:
# - s3fs's listings cache answers ``exists``/``ls`` from earlier listings, so a file another
#   process (or this one, through another path) wrote or deleted can look absent or present;
#   a checkpoint's commit point is one object, so every query here goes to the server.
# - reads must be exactly one ranged GET per call (s3fs files read ahead and cache blocks);
# - positioned multipart writes (several threads filling one object) are not in s3fs's API;
# - retries must be bounded and counted in one place (below), not multiplied by s3fs's and
#   botocore's own loops.
# s3fs still builds the client from the storage options exactly as users expect, and applies
# the user's ``s3_additional_kwargs``/``requester_pays`` to every request (``S3Backend._s3``).
#
# The requests go through s3fs's client and one private s3fs helper, isolated in
# ``S3Backend._s3`` (see there for why). Queries that need no such guarantees (``is_file``,
# ``is_dir``) use s3fs's public API.

S3_PROTOCOLS = _S3_PROTOCOLS = ("s3", "s3a")
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
    :mod:`zero_ckpt.retry`) and bypasses s3fs's retry wrapper (``S3Backend._s3``), so botocore is
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
    """What :meth:`S3Backend.call` returns instead of raising an error the caller expects."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload started under a location and neither completed nor aborted: S3
    keeps (and bills) its parts until it is aborted. ``key`` is relative to the location;
    ``initiated`` is the server's ISO 8601 time."""

    key: str
    upload_id: str
    initiated: str


def open_s3(url: str, storage_options: dict[str, Any], retry: RetryPolicy) -> "S3Backend":
    """The backend of an ``s3://`` URL; ImportError, ValueError or TypeError for options or a
    URL s3fs cannot use (the caller names the location)."""
    fs = _s3_filesystem(storage_options)
    # fsspec's documented way for a filesystem class to turn a URL into its path.
    root = fs._strip_protocol(url).rstrip("/") or "/"
    return S3Backend(fs, root, url, retry)


class S3Backend(Backend):
    """A directory (bucket + key prefix) on S3: every call one request, retried if transient.

    Thread-safe: callers in worker threads block on fsspec's event loop thread, where the
    requests of all threads run concurrently.
    """

    supports_positioned_write = True
    supports_conditional_put = True

    def __init__(self, fs: Any, root: str, url: str, retry: RetryPolicy) -> None:
        super().__init__(fs, root, url, retry)
        # s3fs's split knows access point ARNs, whose "bucket" contains slashes.
        self.bucket, prefix, _ = fs.split_path(root)
        self.prefix = prefix.strip("/")
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

    def canonical_root(self) -> str:
        spelled = super().canonical_root()
        if self.fs.endpoint_url:
            # The same bucket name on two S3 endpoints is two different places.
            spelled = f"{self.fs.endpoint_url.rstrip('/')}#{spelled}"
        return spelled

    async def _s3(self, method: str, **kwargs: Any) -> Any:
        """One request, no retry. This is ``fs._call_s3`` without s3fs's retry wrapper (which
        sleeps after a throttling answer even when it will not try again, and turns errors into
        OSErrors): the user's ``s3_additional_kwargs`` and ``requester_pays`` still apply.

        The one private s3fs call of zero-ckpt (``_get_s3_method_kwargs``) is here: s3fs has
        no public API for a single request without its retry loop, nor for the multipart calls
        (create, upload part, complete, abort, list uploads) that positioned writes from
        several threads need, nor for conditional PUTs; the helper is what applies the user's
        request options exactly as s3fs itself would."""
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

    def exists(self, rel: str) -> bool:
        url = self.url_of(rel)
        key = self.key(rel)
        if not key:  # the bucket itself
            res = self.call(url, "check", lambda: self._s3("head_bucket"), accept=lambda e: _s3_status(e)[0] == 404)
            return not isinstance(res, _Accepted)
        if self.head(rel, url, "check") is not None:
            return True
        # A "directory": any object under the prefix.
        res = self.call(url, "check", lambda: self._s3("list_objects_v2", Prefix=key + "/", MaxKeys=1))
        return bool(res.get("KeyCount") or res.get("Contents"))

    def size(self, rel: str) -> int:
        url = self.url_of(rel)
        info = self.head(rel, url)
        if info is None:
            raise MissingShardError(f"{url} is missing", path=url)
        return int(info["ContentLength"])

    def etag(self, rel: str) -> str | None:
        info = self.head(rel, self.url_of(rel), "check")
        return None if info is None else info["ETag"]

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

    def list_files(self) -> list[str]:
        n = len(self.prefix) + 1 if self.prefix else 0
        # Keys ending in "/" are directory markers some tools write: not files.
        return sorted(k[n:] for k in self.list_keys(self.url) if not k.endswith("/"))

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

    def read_whole(self, rel: str) -> bytes:
        return self.get(rel, self.url_of(rel))

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        # Exactly one ranged GET (retried whole on a transient error), with no caching or
        # read-ahead: callers read disjoint ranges from many threads at once.
        return self.get(rel, self.url_of(rel), start, end)

    # ----- writes ----------------------------------------------------------------------------

    def open_writer(self, rel: str, size: int | None, part_bytes: int | None) -> WriteHandle:
        # One PUT on commit for files up to a part, else a multipart upload whose parts go up
        # as they fill; the object appears only on commit.
        return _S3Upload(self, rel, self.url_of(rel), size, part_bytes)

    def write_buffer_bytes(self, workers: int, part_bytes: int | None) -> int:
        part = max(part_bytes or knobs.s3_part_bytes(), knobs.s3_min_part_bytes())
        return (2 * workers + 1 + knobs.s3_uploads()) * part

    def put(self, rel: str, url: str, data: Any) -> None:
        key = self.key(rel)
        self.call(url, "write", lambda: self._s3("put_object", Key=key, Body=data))

    def put_conditional(self, rel: str, data: bytes, *, if_none_match: bool = False,
                        if_match: str | None = None) -> bool:
        """PUT only if no object is there (``if_none_match``) or only over the object of ETag
        ``if_match``; False when S3 refused for the condition (412, or 409 for a concurrent
        conditional write)."""
        key = self.key(rel)
        cond: dict[str, str] = {}
        if if_none_match:
            cond["IfNoneMatch"] = "*"
        if if_match is not None:
            cond["IfMatch"] = if_match
        res = self.call(
            self.url_of(rel), "create", lambda: self._s3("put_object", Key=key, Body=data, **cond),
            accept=lambda e: _s3_status(e)[0] in (409, 412),
        )
        return not isinstance(res, _Accepted)

    def makedirs(self, rel: str) -> None:
        """Make an empty directory visible: S3 has no directories, a prefix exists while
        something is stored under it, so write the empty ``prefix/`` marker object the S3
        console and most tools use. ``list_files`` skips markers; ``remove_all`` removes them."""
        url = self.url_of(rel)
        key = self.key(rel)
        if key:
            self.call(url, "create", lambda: self._s3("put_object", Key=key + "/", Body=b""))
        elif not self.exists(rel):  # the bucket itself
            raise StorageError(
                f"cannot create {url}: bucket {self.bucket!r} does not exist (create it first; "
                "zero-ckpt does not create buckets)",
                path=url,
            )

    def remove(self, rel: str) -> None:
        """Delete an object; a missing one is fine (S3 answers 204 either way)."""
        key = self.key(rel)
        self.call(self.url_of(rel), "delete", lambda: self._s3("delete_object", Key=key), accept=_is_missing)

    def remove_all(self) -> None:
        url = self.url
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

    # ----- pending multipart uploads -----------------------------------------------------------

    def pending_uploads(self) -> list[PendingUpload]:
        """Every pending multipart upload under the directory (one request per 1,000)."""
        url = self.url
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

    def abort_pending_uploads(self) -> int:
        """Abort every pending multipart upload under the directory; returns how many."""
        pending = self.pending_uploads()
        for up in pending:
            key = self.key(up.key)
            self.call(
                self.url_of(up.key), "abort",
                lambda key=key, uid=up.upload_id: self._s3("abort_multipart_upload", Key=key, UploadId=uid),
                accept=_has_code("NoSuchUpload"),
            )
        return len(pending)

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


class _S3Upload(WriteHandle):
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

    positioned = True
    write_at_needs = "an S3 writer"

    def __init__(self, d: S3Backend, rel: str, url: str, size: int | None, part_bytes: int | None) -> None:
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
    def part_bytes(self) -> int:  # type: ignore[override]
        return self.part

    @property
    def parts(self) -> int | None:
        return None if self.size is None else max(1, math.ceil(self.size / self.part))

    def _part_len(self, p: int) -> int:
        if self.size is None:
            return self.part
        return min(self.part, self.size - p * self.part)

    # ----- filling ---------------------------------------------------------------------------

    def write(self, offset: int, data: Any) -> None:
        self.write_at(offset, data)

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

    def commit(self, fsync: bool = False) -> None:
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

    def discard(self) -> None:
        self.abort()

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
