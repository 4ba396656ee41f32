"""Checking a DCP checkpoint's bytes: DCP records no checksums of its own, but every record is
a ``torch.save`` zip archive whose central directory holds the CRC-32 of each of its entries.

:func:`check_records` streams each record once and compares; ``precheck`` (before a job lets the
records shape an output) and ``zero-ckpt verify`` use it.
"""

from __future__ import annotations

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
) -> tuple[list[Problem], int]:
    """Every record's entries against their zip CRC-32s; ``(problems, bytes read)``."""
    problems: list[Problem] = []
    total = 0
    for rel, offset, length, what in records:
        url = loc.url_of(rel)
        try:
            bad = zip_crc_failures(_SliceLocation(loc, rel, offset, length), rel, chunk_bytes, progress)  # type: ignore[arg-type]
        except CheckpointError as exc:
            kind = "missing" if isinstance(exc, FileNotFoundError) else "structure"
            problems.append(Problem(url, f"{what} (record at bytes {offset}-{offset + length}): {exc}", kind))
            continue
        total += length
        if bad:
            problems.append(Problem(
                url, f"{what} (record at bytes {offset}-{offset + length}): {crc_failure_message(bad)}",
                "checksum",
            ))
    return problems, total
