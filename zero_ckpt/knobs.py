"""Rarely-touched tunables, in one place, each overridable by an environment variable.

Callers pass explicit values where the API offers them; these are the defaults.
"""

from __future__ import annotations

import math
import os

from zero_ckpt.errors import KnobError

__all__ = [
    "open_files",
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


def _env_int(name: str, default: int, maximum: int) -> int:
    """``int(os.environ[name])`` in ``[1, maximum]``; KnobError naming the variable, the value
    and the accepted range otherwise (checked before anything is sized by it)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip()
    try:
        value = int(text) if len(text) <= 40 else None
    except ValueError:
        value = None
    if value is None:
        raise KnobError(
            f"environment variable {name}={raw[:40]!r} must be an integer between 1 and {maximum}; "
            f"unset it for the default ({default})"
        )
    if not 1 <= value <= maximum:
        raise KnobError(
            f"environment variable {name}={value} is out of range: it must be between 1 and "
            f"{maximum}; unset it for the default ({default})"
        )
    return value


def _env_float(name: str, default: float, maximum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip()[:40])
    except ValueError:
        raise KnobError(
            f"environment variable {name}={raw[:40]!r} must be a number between 0 and {maximum}; "
            f"unset it for the default ({default})"
        ) from None
    if not (math.isfinite(value) and 0 <= value <= maximum):  # also refuses NaN and inf
        raise KnobError(
            f"environment variable {name}={raw[:40]!r} is out of range: it must be between 0 and "
            f"{maximum}; unset it for the default ({default})"
        )
    return value


_GiB = 1 << 30


def chunk_bytes() -> int:
    """Bytes moved per read/write call by the executors (ZERO_CKPT_CHUNK_BYTES, 8 MiB)."""
    return _env_int("ZERO_CKPT_CHUNK_BYTES", 8 << 20, 256 << 20)


def io_workers() -> int:
    """Parallel file jobs in reshard/consolidate/verify (ZERO_CKPT_WORKERS, 4).

    I/O and CRC release the GIL, so threads overlap reads, writes and checksums.
    """
    return _env_int("ZERO_CKPT_WORKERS", 4, 256)


def buffer_budget_bytes() -> int:
    """Budget for the executors' buffers together (ZERO_CKPT_BUFFER_BYTES, 192 MiB): transfer
    chunks (about 2 x chunk per worker: 64 MiB with the defaults) plus, for an S3
    destination, the multipart part buffers; workers are reduced until both fit.

    Peak memory of reshard/consolidate/verify is within this plus the interpreter,
    independent of checkpoint size. One worker always runs, whatever the budget.
    """
    return _env_int("ZERO_CKPT_BUFFER_BYTES", 192 << 20, 64 * _GiB)


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
    return _env_int("ZERO_CKPT_RETRIES", 5, 100)


def retry_base_seconds() -> float:
    """First backoff cap in seconds; doubles per failure (ZERO_CKPT_RETRY_BASE_SECONDS, 0.25)."""
    return _env_float("ZERO_CKPT_RETRY_BASE_SECONDS", 0.25, 3600.0)


def retry_max_seconds() -> float:
    """Largest backoff in seconds (ZERO_CKPT_RETRY_MAX_SECONDS, 20)."""
    return _env_float("ZERO_CKPT_RETRY_MAX_SECONDS", 20.0, 3600.0)


def s3_part_bytes() -> int:
    """Part size of S3 multipart uploads (ZERO_CKPT_S3_PART_BYTES, 8 MiB, boto3's default).

    Files up to one part go up in one PUT on commit; larger ones as parts uploaded as soon as
    their bytes are complete. The part size grows for files that would need more than S3's
    10,000 parts. Memory of a multipart write is a few parts per worker (see
    ``zero_ckpt.storage``), so this is also the knob that bounds it.
    """
    return _env_int("ZERO_CKPT_S3_PART_BYTES", 8 << 20, 5 * _GiB)


def s3_min_part_bytes() -> int:
    """Smallest part size S3 accepts for all but the last part (ZERO_CKPT_S3_MIN_PART_BYTES,
    5 MiB, the AWS rule); lower it only for a server configured to accept smaller parts."""
    return _env_int("ZERO_CKPT_S3_MIN_PART_BYTES", 5 << 20, 5 * _GiB)


def s3_uploads() -> int:
    """Part uploads in flight at once per S3 location (ZERO_CKPT_S3_UPLOADS, 4).

    Writers hand a complete part to the upload and carry on filling the next; a writer that
    would exceed this waits for an upload to finish (back-pressure that bounds memory).
    """
    return _env_int("ZERO_CKPT_S3_UPLOADS", 4, 256)


def part_timeout_s() -> int:
    """How long the ranks of a split job under torchrun wait for each other, in seconds
    (ZERO_CKPT_PART_TIMEOUT_S, 24 h): a large job's parts may take hours; a failed rank tears
    the others down earlier."""
    return _env_int("ZERO_CKPT_PART_TIMEOUT_S", 24 * 3600, 30 * 24 * 3600)


def open_files() -> int:
    """Idle read descriptors a location keeps open (ZERO_CKPT_OPEN_FILES, 64; at most 4096).

    Reads of a checkpoint with more shards than this open and close descriptors as needed
    (least recently used first), so any number of shards works under ``ulimit -n 1024``.
    """
    return _env_int("ZERO_CKPT_OPEN_FILES", 64, 4096)
