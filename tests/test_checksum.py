"""Combinable CRC32C: combine() against the real CRC of concatenations, pieces in any order."""

from __future__ import annotations

import random
import signal
import zlib
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zero_ckpt.checksum import (
    ALGORITHM,
    PieceChecksums,
    crc32c,
    crc32c_combine,
    format_checksum,
    parse_checksum,
)

SETTINGS = settings(max_examples=200, deadline=None)
DATA = st.binary(max_size=300)


def test_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4
    assert crc32c(bytes(range(32))) == 0x46DD794E  # RFC 3720 B.4
    assert crc32c(bytearray(b"123456789")) == 0xE3069283
    assert crc32c(memoryview(b"xx123456789")[2:]) == 0xE3069283
    assert format_checksum(crc32c(b"123456789")) == "crc32c:e3069283"


def test_continuation():
    assert crc32c(b"56789", crc32c(b"1234")) == 0xE3069283


def test_combine_known():
    assert crc32c_combine(crc32c(b"1234"), crc32c(b"56789"), 5) == 0xE3069283
    assert crc32c_combine(crc32c(b"123456789"), 0, 0) == 0xE3069283
    assert crc32c_combine(0, crc32c(b"123456789"), 9) == 0xE3069283


@SETTINGS
@given(DATA, DATA)
def test_combine_matches_concatenation(a, b):
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 3 << 20))
def test_combine_long_b(a, zeros):
    """Long lengths exercise the high bits of the x^(8n) table (zeros are cheap to CRC)."""
    b = b"\x00" * zeros + a
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)


def test_combine_not_zlib_crc32():
    # The combination is of CRC-32C, not of zlib's CRC-32: pin that they differ.
    a, b = b"hello ", b"world"
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b) != zlib.crc32(a + b)


@st.composite
def split_and_order(draw):
    data = draw(st.binary(max_size=400))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    pieces = [(s, e) for s, e in zip(bounds, bounds[1:])]  # may include empty pieces
    seed = draw(st.integers(0, 2**32 - 1))
    random.Random(seed).shuffle(pieces)
    return data, pieces


@SETTINGS
@given(split_and_order())
def test_pieces_in_any_order_combine_to_whole(case):
    data, pieces = case
    acc = PieceChecksums()
    for s, e in pieces:
        acc.add(s, e - s, crc32c(data[s:e]))
    assert acc.covered() == len(data)
    assert acc.combine(len(data)) == crc32c(data)


@SETTINGS
@given(split_and_order(), st.integers(1, 4))
def test_pieces_gathered_by_several_workers_then_extended(case, workers):
    data, pieces = case
    parts = [PieceChecksums() for _ in range(workers)]
    for i, (s, e) in enumerate(pieces):
        parts[i % workers].add(s, e - s, crc32c(data[s:e]))
    total = PieceChecksums()
    for p in parts:
        total.extend(p)
    assert total.combine(len(data)) == crc32c(data)


def test_empty_pieces_are_dropped():
    acc = PieceChecksums()
    acc.add(0, 0, 0)
    acc.add(5, 0, 123)
    assert acc.pieces == []
    assert acc.combine(0) == 0 == crc32c(b"")


def pieces_of(data, ranges):
    acc = PieceChecksums()
    for s, e in ranges:
        acc.add(s, e - s, crc32c(data[s:e]))
    return acc


DATA10 = b"0123456789"


@pytest.mark.parametrize(
    "ranges, file_bytes, match",
    [
        ([(0, 4), (5, 10)], 10, "expected a piece at byte 4, got one at 5"),  # gap
        ([(1, 10)], 10, "expected a piece at byte 0, got one at 1"),  # missing head
        ([(0, 6), (4, 10)], 10, "expected a piece at byte 6, got one at 4"),  # overlap
        ([(0, 10), (0, 10)], 10, "expected a piece at byte 10, got one at 0"),  # duplicate
        ([(0, 5), (5, 10), (5, 7)], 10, "expected a piece at byte 7, got one at 5"),  # overlap inside
        ([(0, 5)], 10, "checksum pieces cover 5 bytes of 10"),  # missing tail
        ([(0, 10)], 9, "checksum pieces cover 10 bytes of 9"),  # beyond the file
        ([], 10, "checksum pieces cover 0 bytes of 10"),
    ],
)
def test_gaps_and_overlaps_raise(ranges, file_bytes, match):
    with pytest.raises(ValueError, match=match):
        pieces_of(DATA10, ranges).combine(file_bytes)


@contextmanager
def time_limit(seconds: float):
    """Turn a hang into a failure (SIGALRM: main thread, POSIX)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("where", ["crc32c_combine", "PieceChecksums"])
def test_negative_length_raises_instead_of_hanging(where):
    with time_limit(0.5), pytest.raises(ValueError):
        if where == "crc32c_combine":
            crc32c_combine(crc32c(b"a"), crc32c(b"b"), -1)
        else:
            acc = PieceChecksums()
            acc.add(0, 4, crc32c(b"abcd"))
            acc.add(4, -1, 0)
            acc.combine(3)


# ----- text form --------------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_format_parse_round_trip(crc):
    text = format_checksum(crc)
    assert text.startswith("crc32c:") and len(text) == 15
    assert text == text.lower()
    assert parse_checksum(text) == crc


def test_format_examples():
    assert ALGORITHM == "crc32c"
    assert format_checksum(0) == "crc32c:00000000"
    assert format_checksum(0xE3069283) == "crc32c:e3069283"
    assert format_checksum(0xFFFFFFFF) == "crc32c:ffffffff"
    assert parse_checksum("crc32c:E3069283") == 0xE3069283  # upper-case hex is still hex


@pytest.mark.parametrize(
    "text",
    [
        "",
        "crc32c",
        "crc32c:",
        "crc32c:e306928",  # 7 digits
        "crc32c:e30692830",  # 9 digits
        "crc32:e3069283",
        "CRC32C:e3069283",
        "md5:e3069283",
        "e3069283",
        ":e3069283",
        "crc32c:e3069283 ",
    ],
)
def test_parse_errors(text):
    with pytest.raises(ValueError) as info:
        parse_checksum(text)
    assert str(info.value) == f"checksum {text!r} is not of the form 'crc32c:<8 hex digits>'"


@pytest.mark.parametrize(
    "text",
    ["crc32c:-1234567", "crc32c:+1234567", "crc32c: 1234567", "crc32c:1234_567", "crc32c:zzzzzzzz", "crc32c:0x123456"],
)
def test_parse_rejects_non_hex_digits(text):
    with pytest.raises(ValueError) as info:
        parse_checksum(text)
    assert str(info.value) == f"checksum {text!r} is not of the form 'crc32c:<8 hex digits>'"


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_zip_crc32_combine_matches_zlib(a: bytes, b: bytes) -> None:
    import zlib

    from zero_ckpt.checksum import zip_crc32_combine

    assert zip_crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    pieces = PieceChecksums()
    pieces.add(len(a), len(b), zlib.crc32(b))
    pieces.add(0, len(a), zlib.crc32(a))
    assert pieces.combine(len(a) + len(b), zip_crc32_combine) == zlib.crc32(a + b)
