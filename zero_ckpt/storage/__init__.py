"""Storage over fsspec: a checkpoint directory at any URL, ranged reads, writes, atomic commit.

Every backend quirk lives in this package, commented with the why. URLs stay ``str`` end to
end (``pathlib.Path`` would turn ``s3://bucket`` into ``s3:/bucket``). Errors become
``CheckpointError`` subclasses naming the URL of the file concerned.

Writes are never visible under their final name until complete: on local disk a file is
written to a temporary sibling, fsynced and renamed into place; on object stores an object
appears only when its upload finishes. A checkpoint's commit point is ``manifest.json``,
written last by :meth:`Location.write_atomic`.

A :class:`Location` holds one backend (the small interface of :mod:`.backend`), chosen once
when it is opened, and delegates to it:

- :mod:`.local`: local POSIX disk (pooled descriptors and ``pread``, regular files only,
  temporary sibling + fsync + rename);
- :mod:`.s3`: S3 (``s3://``, ``s3a://``) through s3fs's client with direct object calls (one
  ranged GET per read, multipart uploads filled by positioned writes), every call retried on
  transient errors by :class:`zero_ckpt.retry.RetryPolicy`;
- :mod:`.fsspec_backend`: any other fsspec filesystem (``memory://``, gcs, azure, ...), remote
  calls retried on connection errors.

Nothing outside this package looks at a Location's filesystem or backend: callers use the
Location's methods (``local_path``, ``is_file``, ``supports_positioned_write``, ...).
"""

from __future__ import annotations

import os  # noqa: F401 - tests patch ``zero_ckpt.storage.os`` (the os module itself)

from zero_ckpt.storage.backend import Backend, WriteHandle  # noqa: F401 - for new backends
from zero_ckpt.storage.location import (
    FileWriter,
    Location,
    abort_pending_uploads,
    check_distinct,
    list_pending_uploads,
    open_location,
    read_capped,
)
from zero_ckpt.storage.s3 import (  # noqa: F401 - private names kept reachable for tests
    PendingUpload,
    _Accepted,
    _is_multipart_etag_of,
    _s3_status,
)

__all__ = [
    "Location",
    "open_location",
    "FileWriter",
    "check_distinct",
    "read_capped",
    "list_pending_uploads",
    "abort_pending_uploads",
    "PendingUpload",
]
