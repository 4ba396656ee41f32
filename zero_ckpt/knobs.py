"""Rarely-touched tunables, in one place, each overridable by an environment variable.

Callers pass explicit values where the API offers them; these are the defaults.
"""

from __future__ import annotations

import os

__all__ = [
    "part_timeout_s",
    "chunk_bytes",
    "io_workers",
    "buffer_budget_bytes",
    "fsync",
    "retry_attempts",
    "retry_base_seconds",
    "retry_max_seconds",
    "s3_part_bytes",
    "s3_min_part_bytes",
    "s3_uploads",
]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None
    if value < 1:
        raise ValueError(f"environment variable {name}={raw!r} must be at least 1")
    return value


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be a number") from None
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"environment variable {name}={raw!r} must be at least 0")
    return value


def chunk_bytes() -> int:
    """Bytes moved per read/write call by the executors (ZERO_CKPT_CHUNK_BYTES, 8 MiB)."""
    return _env_int("ZERO_CKPT_CHUNK_BYTES", 8 << 20)


def io_workers() -> int:
    """Parallel file jobs in reshard/consolidate/verify (ZERO_CKPT_WORKERS, 4).

    I/O and CRC release the GIL, so threads overlap reads, writes and checksums.
    """
    return _env_int("ZERO_CKPT_WORKERS", 4)


def buffer_budget_bytes() -> int:
    """Budget for the executors' buffers together (ZERO_CKPT_BUFFER_BYTES, 192 MiB): transfer
    chunks (about 2 x chunk per worker: 64 MiB with the defaults) plus, for an S3
    destination, the multipart part buffers; workers are reduced until both fit.

    Peak memory of reshard/consolidate/verify is within this plus the interpreter,
    independent of checkpoint size. One worker always runs, whatever the budget.
    """
    return _env_int("ZERO_CKPT_BUFFER_BYTES", 192 << 20)


def fsync() -> bool:
    """Whether local writes are fsynced before they are renamed into place (ZERO_CKPT_FSYNC,
    on). Turn off only for scratch output: without it a power loss after the manifest commit
    can leave shards the manifest vouches for unwritten."""
    return os.environ.get("ZERO_CKPT_FSYNC", "1").strip().lower() not in ("0", "false", "no", "off")


def retry_attempts() -> int:
    """Attempts per remote storage call, the first included (ZERO_CKPT_RETRIES, 5).

    Transient errors (connection reset, HTTP 500/503, throttling) are retried with exponential
    backoff and jitter up to this many attempts in all; permanent ones (404, 403) never are.
    """
    return _env_int("ZERO_CKPT_RETRIES", 5)


def retry_base_seconds() -> float:
    """First backoff cap in seconds; doubles per failure (ZERO_CKPT_RETRY_BASE_SECONDS, 0.25)."""
    return _env_float("ZERO_CKPT_RETRY_BASE_SECONDS", 0.25)


def retry_max_seconds() -> float:
    """Largest backoff in seconds (ZERO_CKPT_RETRY_MAX_SECONDS, 20)."""
    return _env_float("ZERO_CKPT_RETRY_MAX_SECONDS", 20.0)


def s3_part_bytes() -> int:
    """Part size of S3 multipart uploads (ZERO_CKPT_S3_PART_BYTES, 8 MiB, boto3's default).

    Files up to one part go up in one PUT on commit; larger ones as parts uploaded as soon as
    their bytes are complete. The part size grows for files that would need more than S3's
    10,000 parts. Memory of a multipart write is a few parts per worker (see
    ``zero_ckpt.storage``), so this is also the knob that bounds it.
    """
    return _env_int("ZERO_CKPT_S3_PART_BYTES", 8 << 20)


def s3_min_part_bytes() -> int:
    """Smallest part size S3 accepts for all but the last part (ZERO_CKPT_S3_MIN_PART_BYTES,
    5 MiB, the AWS rule); lower it only for a server configured to accept smaller parts."""
    return _env_int("ZERO_CKPT_S3_MIN_PART_BYTES", 5 << 20)


def s3_uploads() -> int:
    """Part uploads in flight at once per S3 location (ZERO_CKPT_S3_UPLOADS, 4).

    Writers hand a complete part to the upload and carry on filling the next; a writer that
    would exceed this waits for an upload to finish (back-pressure that bounds memory).
    """
    return _env_int("ZERO_CKPT_S3_UPLOADS", 4)


def part_timeout_s() -> int:
    """How long the ranks of a split job under torchrun wait for each other, in seconds
    (ZERO_CKPT_PART_TIMEOUT_S, 24 h): a large job's parts may take hours; a failed rank tears
    the others down earlier."""
    return _env_int("ZERO_CKPT_PART_TIMEOUT_S", 24 * 3600)
