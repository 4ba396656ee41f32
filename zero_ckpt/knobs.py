"""Rarely-touched tunables, in one place, each overridable by an environment variable.

Callers pass explicit values where the API offers them; these are the defaults.
"""

from __future__ import annotations

import os

__all__ = ["chunk_bytes", "io_workers", "buffer_budget_bytes", "fsync"]


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


def chunk_bytes() -> int:
    """Bytes moved per read/write call by the executors (ZERO_CKPT_CHUNK_BYTES, 8 MiB)."""
    return _env_int("ZERO_CKPT_CHUNK_BYTES", 8 << 20)


def io_workers() -> int:
    """Parallel file jobs in reshard/consolidate/verify (ZERO_CKPT_WORKERS, 4).

    I/O and CRC release the GIL, so threads overlap reads, writes and checksums.
    """
    return _env_int("ZERO_CKPT_WORKERS", 4)


def buffer_budget_bytes() -> int:
    """Upper bound on the executors' transfer buffers together (ZERO_CKPT_BUFFER_BYTES, 64 MiB).

    Peak memory of reshard/consolidate/verify is this plus the interpreter, independent of
    checkpoint size.
    """
    return _env_int("ZERO_CKPT_BUFFER_BYTES", 64 << 20)


def fsync() -> bool:
    """Whether local writes are fsynced before they are renamed into place (ZERO_CKPT_FSYNC,
    on). Turn off only for scratch output: without it a power loss after the manifest commit
    can leave shards the manifest vouches for unwritten."""
    return os.environ.get("ZERO_CKPT_FSYNC", "1").strip().lower() not in ("0", "false", "no", "off")
