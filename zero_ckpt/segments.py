"""What fills an output file: typed segments the engine runs in order (pure: no I/O, no torch).

A :class:`~zero_ckpt.plan.FilePlan` is ``header_bytes`` at offset 0 followed by ``ops``, a
sequence of segments that tile the rest of the file in order. Every writer (format-v1 shards,
safetensors consolidation, DeepSpeed's torch.save archives, DCP files) plans files of these and
hands them to :func:`zero_ckpt.transfer.run_file_plans`, the one streaming engine:

* :class:`~zero_ckpt.plan.CopyOp`: ``numel`` elements read from a source file, cast when its
  dtypes differ (a raw byte copy is ``uint8`` to ``uint8``); its ``dst_start`` is the absolute
  offset it fills and must be where the tiling puts it;
* :class:`CastViaSegment`: a CopyOp whose values are first cast to ``via`` (a master through
  the model dtype, then ``.float()``: what ``param.float()`` of a bf16 module weight gives);
* :class:`ZerosSegment`: ``nbytes`` zero bytes (padding a source does not store);
* :class:`LiteralSegment`: bytes known at planning time (headers, pickles, small records);
* :class:`Crc32Segment`: bytes computed from the zlib CRC-32 of byte ranges written *earlier in
  the same file* (a zip record's data descriptor, a zip central directory). The engine writes a
  file holding one sequentially (one task, in order) and accumulates the CRC-32 of the named
  ranges as their bytes stream past, so no byte is read back.

A torch.save archive (DeepSpeed ``.pt`` files, DCP ``.distcp`` records) is then a plan of:
literal local header, copy/cast/zeros/literal segments for each record's data, a computed
descriptor per record, and one computed central directory + end records; its size is known
before any byte is read because no CRC changes a length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

from zero_ckpt.errors import CheckpointError
from zero_ckpt.plan import CopyOp

__all__ = [
    "CastViaSegment",
    "Crc32Segment",
    "LiteralSegment",
    "Segment",
    "SegmentPlanError",
    "ZerosSegment",
    "check_segments",
    "segment_nbytes",
]


class SegmentPlanError(CheckpointError, ValueError):
    """A file plan whose segments do not tile the file it names (a planner's bug: the message
    says which file, which segment and the sizes)."""


@dataclass(frozen=True)
class ZerosSegment:
    """``nbytes`` zero bytes."""

    nbytes: int

    @property
    def dst_nbytes(self) -> int:
        return self.nbytes


@dataclass(frozen=True)
class LiteralSegment:
    """Bytes known when planning, written as they are."""

    data: bytes

    @property
    def dst_nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class CastViaSegment:
    """``op``'s elements cast to ``via`` and then to ``op.dst_dtype`` (rounded through ``via``)."""

    op: CopyOp
    via: str

    @property
    def dst_nbytes(self) -> int:
        return self.op.dst_nbytes


@dataclass(frozen=True)
class Crc32Segment:
    """``nbytes`` bytes that ``render(crcs)`` computes from the zlib CRC-32 of each of
    ``ranges`` (``(start, length)``, absolute byte ranges of the same file, ending at or before
    this segment's offset; disjoint or equal). ``render`` must be pure and return exactly
    ``nbytes`` bytes."""

    nbytes: int
    ranges: tuple[tuple[int, int], ...]
    render: Callable[[tuple[int, ...]], bytes]

    @property
    def dst_nbytes(self) -> int:
        return self.nbytes


Segment = Union[CopyOp, CastViaSegment, ZerosSegment, LiteralSegment, Crc32Segment]
_TYPES = (CopyOp, CastViaSegment, ZerosSegment, LiteralSegment, Crc32Segment)


def segment_nbytes(seg: Segment) -> int:
    """Bytes the segment writes."""
    return seg.dst_nbytes


def check_segments(path: str, header_bytes: int, segments: Sequence[Segment], file_bytes: int) -> list[int]:
    """Each segment's absolute offset in ``path``; raises :class:`SegmentPlanError` unless the
    segments tile ``[header_bytes, file_bytes)`` in order and every CRC range precedes its user."""
    offsets = []
    pos = header_bytes
    for i, seg in enumerate(segments):
        if not isinstance(seg, _TYPES):
            raise SegmentPlanError(f"{path}: segment {i} is a {type(seg).__name__}, not a segment the engine runs",
                                   path=path)
        op = seg.op if isinstance(seg, CastViaSegment) else seg
        start = op.dst_start if isinstance(op, CopyOp) else pos
        if start != pos:
            raise SegmentPlanError(
                f"{path}: segment {i} is planned at byte {start}, but the segments before it end at {pos}",
                path=path, expected=pos, actual=start,
            )
        if isinstance(seg, Crc32Segment):
            for s, n in seg.ranges:
                if s < 0 or n < 0 or s + n > pos:
                    raise SegmentPlanError(
                        f"{path}: segment {i} at byte {pos} needs the CRC-32 of bytes [{s}, {s + n}), "
                        "which are not all written before it",
                        path=path,
                    )
        offsets.append(pos)
        pos += seg.dst_nbytes
    if pos != file_bytes:
        raise SegmentPlanError(
            f"{path}: the header and segments make {pos} bytes, the plan says the file has {file_bytes}",
            path=path, expected=file_bytes, actual=pos,
        )
    return offsets
