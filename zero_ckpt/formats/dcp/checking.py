"""Checking a DCP checkpoint's bytes: DCP records no checksums of its own, but every record is
a ``torch.save`` zip archive whose central directory holds the CRC-32 of each of its entries.

:func:`check_records` streams each record once and compares; ``precheck`` (before a job lets the
records shape an output) and ``zero-ckpt verify`` use it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from zero_ckpt.errors import CheckpointError, Problem
from zero_ckpt.formats.dcp.records import _SliceLocation
from zero_ckpt.formats.torch_zip import crc_failure_message, zip_crc_failures
from zero_ckpt.storage import Location

__all__ = ["records_of", "check_records"]


def records_of(meta: Any) -> list[tuple[str, int, int, str]]:
    """``(file, byte offset, byte length, what)`` of every storage record of a
    :class:`~zero_ckpt.formats.dcp.metadata.DcpMetadata`, in file order."""
    out = {}
    for t in meta.tensors.values():
        for c in t.chunks:
            out[(c.file, c.byte_offset, c.byte_length)] = f"{t.fqn} at offsets {list(c.offsets)}"
    for b in meta.bytes_items.values():
        out[(b.file, b.byte_offset, b.byte_length)] = b.fqn
    return sorted((f, o, n, what) for (f, o, n), what in out.items())


def check_records(
    loc: Location,
    records: Iterable[tuple[str, int, int, str]],
    chunk_bytes: int = 8 << 20,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> tuple[list[Problem], int]:
    """Every record's entries against their zip CRC-32s, ``workers`` records at a time (zlib's
    CRC-32 releases the GIL); ``(problems in record order, bytes read)``."""

    def one(record: tuple[str, int, int, str]) -> tuple[Problem | None, int]:
        rel, offset, length, what = record
        url = loc.url_of(rel)
        where = f"{what} (record at bytes {offset}-{offset + length})"
        try:
            bad = zip_crc_failures(_SliceLocation(loc, rel, offset, length), rel, chunk_bytes, progress)  # type: ignore[arg-type]
        except CheckpointError as exc:
            kind = "missing" if isinstance(exc, FileNotFoundError) else "structure"
            return Problem(url, f"{where}: {exc}", kind), 0
        if bad:
            return Problem(url, f"{where}: {crc_failure_message(bad)}", "checksum"), length
        return None, length

    with ThreadPoolExecutor(max_workers=max(1, workers or min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(one, list(records)))
    return [p for p, _ in results if p is not None], sum(n for _, n in results)
