"""CRC32C checksums that combine: a file's checksum from its pieces' checksums, in any order.

Why CRC32C: hardware-accelerated (about 14 GB/s on one core here through the ``crc32c``
package), and CRCs compose: ``crc(A + B)`` follows from ``crc(A)``, ``crc(B)`` and ``len(B)``.
Reshard, consolidate and a resharded load read every source byte exactly once but not in file
order (different writers or ranks read different ranges), so they checksum each range as it
passes and combine afterwards: sources are verified and destinations checksummed in the same
single pass, without re-reading anything. The manifest spells a checksum ``crc32c:<8 hex>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import crc32c as _crc32c

__all__ = [
    "ALGORITHM",
    "crc32c",
    "crc32c_combine",
    "zip_crc32_combine",
    "format_checksum",
    "parse_checksum",
    "PieceChecksums",
]

ALGORITHM = "crc32c"
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")
_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_ZLIB_POLY = 0xEDB88320  # CRC-32 of zlib and zip (IEEE 802.3), reflected


def crc32c(data, value: int = 0) -> int:
    """CRC32C of a bytes-like object, continuing from ``value`` (the CRC of what came before)."""
    return _crc32c.crc32c(data, value)


def _multmodp(a: int, b: int, poly: int) -> int:
    """Product of two polynomials modulo the CRC polynomial (reflected bit order, as zlib)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ poly if b & 1 else b >> 1
    return p


def _x2n_table(poly: int) -> list[int]:
    table = [1 << 30]  # x^(2^0)
    for _ in range(1, 32):
        table.append(_multmodp(table[-1], table[-1], poly))
    return table


_X2N = {_POLY: _x2n_table(_POLY), _ZLIB_POLY: _x2n_table(_ZLIB_POLY)}


def _x8nmodp(nbytes: int, poly: int) -> int:
    """x^(8 * nbytes) modulo the polynomial."""
    table = _X2N[poly]
    p = 1 << 31  # x^0
    k = 3
    while nbytes:
        if nbytes & 1:
            p = _multmodp(table[k & 31], p, poly)
        nbytes >>= 1
        k += 1
    return p


def _combine(crc_a: int, crc_b: int, len_b: int, poly: int) -> int:
    if len_b < 0:
        raise ValueError(f"length must be >= 0, got {len_b}")
    return _multmodp(_x8nmodp(len_b, poly), crc_a, poly) ^ crc_b


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC32C of ``A + B`` given ``crc(A)``, ``crc(B)`` and ``len(B)`` in bytes."""
    return _combine(crc_a, crc_b, len_b, _POLY)


def zip_crc32_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """zlib's CRC-32 (what zip records hold) of ``A + B`` from ``crc(A)``, ``crc(B)``, ``len(B)``."""
    return _combine(crc_a, crc_b, len_b, _ZLIB_POLY)


def format_checksum(crc: int) -> str:
    return f"{ALGORITHM}:{crc:08x}"


def parse_checksum(text: str) -> int:
    """``"crc32c:1a2b3c4d"`` -> int; ValueError for another algorithm or a malformed value."""
    algo, sep, digits = text.partition(":")
    if algo != ALGORITHM or not sep or not _HEX8.fullmatch(digits):
        raise ValueError(f"checksum {text!r} is not of the form '{ALGORITHM}:<8 hex digits>'")
    return int(digits, 16)


@dataclass
class PieceChecksums:
    """CRCs of pieces of one file, gathered in any order, combined into the file's CRC.

    ``add(offset, length, crc)`` per piece; ``combine(file_bytes)`` requires the pieces to tile
    ``[0, file_bytes)`` exactly (a gap or overlap is a bug in the caller: ValueError).
    """

    pieces: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, offset: int, length: int, crc: int) -> None:
        if length < 0 or offset < 0:
            raise ValueError(f"piece at {offset} of length {length}: both must be >= 0")
        if length:
            self.pieces.append((offset, length, crc))

    def extend(self, other: "PieceChecksums") -> None:
        self.pieces.extend(other.pieces)

    def covered(self) -> int:
        return sum(length for _, length, _ in self.pieces)

    def combine(self, file_bytes: int, combine: "Callable[[int, int, int], int]" = crc32c_combine) -> int:
        """The CRC of ``[0, file_bytes)`` from the pieces (``combine``: the polynomial's
        combination, CRC32C by default, :func:`zip_crc32_combine` for zlib CRC-32 pieces)."""
        total = 0
        cursor = 0
        for offset, length, crc in sorted(self.pieces):
            if offset != cursor:
                raise ValueError(
                    f"checksum pieces do not tile the file: expected a piece at byte {cursor}, "
                    f"got one at {offset}"
                )
            total = combine(total, crc, length)
            cursor += length
        if cursor != file_bytes:
            raise ValueError(f"checksum pieces cover {cursor} bytes of {file_bytes}")
        return total
