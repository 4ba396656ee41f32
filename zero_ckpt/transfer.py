"""The execution engine: move bytes along a plan with bounded memory, in parallel, verified.

Shared by reshard, consolidate, load and every format writer. It reads source headers (checked
against the manifest), runs :class:`~zero_ckpt.plan.FilePlan` lists of typed segments
(:mod:`zero_ckpt.segments`: copy, cast, zeros, literal bytes, CRC-32-computed zip records)
through a thread pool with one reusable buffer per worker, checksums every piece it reads and
writes (CRC32C, combined afterwards, so sources are verified and outputs checksummed in one
pass), reports progress, and on any failure removes everything it wrote. A file holding a
CRC-32-computed segment is written by one task in order (its CRC-32s accumulate as the bytes
stream past); other local and S3 files are filled by several workers with positioned writes.

Memory: at most ``workers`` x (``chunk_bytes`` + a cast buffer) at once, independent of the
checkpoint's size.
"""

from __future__ import annotations

import bisect
import threading
import zlib
import zlib
from collections import defaultdict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence


from zero_ckpt import knobs
from zero_ckpt.checksum import PieceChecksums, crc32c, format_checksum, parse_checksum, zip_crc32_combine
from zero_ckpt.errors import CheckpointError, Problem

# Re-exported: executors import the readers from here together with the engine.
from zero_ckpt.opening import load_manifest, read_header, read_source_headers
from zero_ckpt.manifest import FileMeta
from zero_ckpt.plan import CopyOp, FilePlan
from zero_ckpt.safetensors_format import SafetensorsHeader
from zero_ckpt.segments import (
    CastViaSegment,
    Crc32Segment,
    LiteralSegment,
    Segment,
    SegmentPlanError,
    ZerosSegment,
    check_segments,
)
from zero_ckpt.storage import FileWriter, Location

if TYPE_CHECKING:
    from zero_ckpt.view import SourceView

__all__ = [
    "ProgressFn",
    "ProgressTracker",
    "SourceChecks",
    "WrittenFile",
    "load_manifest",
    "read_source_headers",
    "read_header",
    "run_file_plans",
    "write_and_commit",
    "copy_op_into",
    "resolve_workers",
]

ProgressFn = Callable[[int, int], None]
_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
)


def _torch_dtype(name: str):  # noqa: ANN202 (torch is imported only when a cast is planned)
    """torch's dtype for a safetensors dtype name. Byte-moving jobs (reshard, verify, convert
    without a cast) never call this, so they never import torch (1.3 s of start-up)."""
    import torch

    if name not in _DTYPE_NAMES:
        raise KeyError(name)
    return getattr(torch, name)
# Positioned writes let several workers fill one local file; each takes this many bytes.
_SEGMENT_BYTES = 64 << 20
# Zero bytes handed out for ZerosSegment, shared read-only by every worker.
_ZEROS = bytes(1 << 20)


class ProgressTracker:
    """Serialises progress callbacks from worker threads: ``fn(done_bytes, total_bytes)``."""

    def __init__(self, fn: ProgressFn | None, total: int) -> None:
        self.fn = fn
        self.total = total
        self.done = 0
        self._lock = threading.Lock()
        if fn is not None:
            fn(0, total)

    def add(self, nbytes: int) -> None:
        if self.fn is None:
            return
        with self._lock:
            self.done += nbytes
            self.fn(self.done, self.total)


def resolve_workers(workers: int | None, chunk_bytes: int, dst: Location | None = None) -> int:
    """The most workers (up to the wanted count) whose buffers fit the budget
    (``ZERO_CKPT_BUFFER_BYTES``): about two chunks each, plus what the destination's writers
    hold for them (S3 multipart part buffers; nothing on local disk). Never fewer than one."""
    wanted = workers or knobs.io_workers()
    budget = knobs.buffer_budget_bytes()

    def need(n: int) -> int:
        return 2 * n * chunk_bytes + (dst.write_buffer_bytes(n) if dst is not None else 0)

    n = max(1, wanted)
    while n > 1 and need(n) > budget:
        n -= 1
    return n


# ----- reading a checkpoint's metadata --------------------------------------------------------


# ----- verification of what was read -----------------------------------------------------------


@dataclass
class SourceChecks:
    """CRCs of the source pieces a job read, checked against the manifest's checksums.

    A tensor is checked when the job read all of it (reshard and load read everything,
    consolidate every master); a file's own checksum when every byte of it was read.
    """

    pieces: dict[tuple[str, str | None], PieceChecksums] = field(default_factory=lambda: defaultdict(PieceChecksums))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # zip records checked by their zlib CRC-32 as they stream (see SourceChecksInfo.zip_units)
    zip_units: Mapping[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    zip_pieces: dict[tuple[str, str], PieceChecksums] = field(default_factory=lambda: defaultdict(PieceChecksums))

    def add(self, file: str, tensor: str | None, offset: int, length: int, crc: int) -> None:
        with self._lock:
            self.pieces[(file, tensor)].add(offset, length, crc)

    def add_read(self, file: str, tensor: str | None, offset: int, data: memoryview) -> None:
        """Record the checksums of source bytes just read (``offset`` inside ``tensor``)."""
        self.add(file, tensor, offset, len(data), crc32c(data))
        if tensor is not None and (file, tensor) in self.zip_units:
            crc = zlib.crc32(data)
            with self._lock:
                self.zip_pieces[(file, tensor)].add(offset, len(data), crc)

    def streamed_all(self, plans: Sequence[FilePlan]) -> bool:
        """Whether every source byte the plans read lies in a zip unit that was read whole, and
        so was checked against its CRC-32 as it streamed. Call after the plans ran."""
        if not self.zip_units:
            return False
        used = set()
        for plan in plans:
            for seg in plan.ops:
                op = seg.op if isinstance(seg, CastViaSegment) else seg
                if isinstance(op, CopyOp) and op.numel:
                    key = (op.src_file, op.src_tensor)
                    if key not in self.zip_units:
                        return False
                    used.add(key)
        return all(
            key in self.zip_pieces and self.zip_pieces[key].covered() == self.zip_units[key][1]
            for key in used
        )

    def zip_problems(self, loc: Location) -> list[Problem]:
        """Every zip unit read whole whose bytes do not match the CRC-32 its zip records."""
        out = []
        for key, pc in sorted(self.zip_pieces.items()):
            crc, nbytes = self.zip_units[key]
            if pc.covered() == nbytes and pc.combine(nbytes, zip_crc32_combine) != crc:
                file, unit = key
                out.append(Problem(
                    loc.url_of(file), f"{unit}: its bytes do not match the CRC-32 its zip record "
                    "holds (the file is damaged; restore it from a good copy)", "checksum",
                ))
        return out

    def merge(self, other: "SourceChecks") -> None:
        for key, pc in other.pieces.items():
            self.pieces[key].extend(pc)

    def problems(
        self,
        loc: Location,
        files: Iterable[FileMeta],
        headers: Mapping[str, SafetensorsHeader],
        header_crcs: Mapping[str, int],
    ) -> list[Problem]:
        out = []
        for meta in files:
            url = loc.url_of(meta.path)
            raw = self.pieces.get((meta.path, None))
            if raw is not None:  # a raw whole-file copy
                if raw.covered() != meta.bytes:
                    out.append(Problem(
                        url, f"was copied as {raw.covered()} bytes, the manifest says {meta.bytes} "
                        "(truncated or replaced?); restore it from a good copy", "size", meta.rank,
                    ))
                elif raw.combine(meta.bytes) != parse_checksum(meta.checksum):
                    out.append(_checksum_problem(url, "file", meta))
                continue
            header = headers.get(meta.path)
            if header is None:
                continue
            if meta.tensors and set(meta.tensors) != set(header.tensors):
                # A renamed tensor would otherwise go unchecked (no recorded checksum to
                # compare) and shape the output under its new name.
                changed = sorted(set(meta.tensors) ^ set(header.tensors))[:3]
                out.append(Problem(
                    url, f"its header names tensors {changed} that the manifest does not record as "
                    "such: the header is damaged (restore this file from a good copy)",
                    "checksum", meta.rank,
                ))
                continue
            crcs: dict[str, int] = {}
            for name, entry in header.tensors.items():
                pc = self.pieces.get((meta.path, name))
                if pc is None or pc.covered() != entry.nbytes:
                    continue
                crcs[name] = pc.combine(entry.nbytes)
                recorded = meta.tensors.get(name)
                if recorded is not None and crcs[name] != parse_checksum(recorded):
                    out.append(_checksum_problem(url, f"tensor {name!r}", meta))
            # Every tensor read whole: the file checksum also covers the header (dtypes, shapes,
            # offsets, metadata), so an altered header that still parses is caught.
            if meta.path in header_crcs and len(crcs) == len(header.tensors) and not _out_has(out, url):
                whole = _combine_file(header, header_crcs[meta.path], crcs)
                if whole is not None and whole != parse_checksum(meta.checksum):
                    out.append(_checksum_problem(url, "file", meta))
        return out


def _out_has(problems: list[Problem], url: str) -> bool:
    return any(p.path == url for p in problems)


def _combine_file(header: SafetensorsHeader, header_crc: int, tensor_crcs: Mapping[str, int]) -> int | None:
    pieces = PieceChecksums()
    pieces.add(0, header.data_start, header_crc)
    for name, entry in header.tensors.items():
        pieces.add(entry.start, entry.nbytes, tensor_crcs[name])
    try:
        return pieces.combine(header.file_bytes)
    except ValueError:  # gaps between tensors (not written by us): cannot combine
        return None


def _checksum_problem(url: str, what: str, meta: FileMeta) -> Problem:
    return Problem(
        url,
        f"checksum mismatch in {what}: the data is corrupted (restore this file from a good copy)",
        "checksum",
        meta.rank,
    )


# ----- running plans ---------------------------------------------------------------------------


@dataclass
class WrittenFile:
    """What the engine wrote: size, whole-file CRC and per-tensor CRCs."""

    path: str
    bytes: int
    crc: int
    tensor_crcs: dict[str, int]

    def meta(self, rank: int | None = None) -> FileMeta:
        return FileMeta(
            self.path,
            self.bytes,
            format_checksum(self.crc),
            rank,
            {k: format_checksum(v) for k, v in self.tensor_crcs.items()},
        )


class _FileJob:
    """One output file being filled by one or more segments. Its writer is opened when the
    first segment starts and committed when the last ends, so only the files in progress hold
    a descriptor or buffers (a plan of 4096 files runs under ``ulimit -n 1024``)."""

    def __init__(self, plan: FilePlan, dst: Location, positioned: bool, segments: int,
                 crcs: "_Crc32Ranges | None" = None) -> None:
        self.plan = plan
        self.crcs = crcs
        self.dst = dst
        self.positioned = positioned
        self.writer: FileWriter | None = None
        self.remaining = segments
        self.pieces = PieceChecksums()
        self.tensor_pieces: dict[str, PieceChecksums] = defaultdict(PieceChecksums)
        self.lock = threading.Lock()
        self.committed = False
        self.aborted = False

    def open(self) -> FileWriter:
        with self.lock:
            if self.aborted:
                raise _Stopped()
            if self.writer is None:
                self.writer = self.dst.writer(self.plan.path, self.plan.file_bytes)
            return self.writer

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            writer = self.writer
        if writer is not None and not self.committed:
            writer.abort()


class _Stopped(Exception):
    """A task that found the job already failing: nothing to report."""


def _segments(plan: FilePlan, parallel: bool) -> list[list[tuple[int, Segment]]]:
    """The plan's segments with their offsets, cut into tasks of about ``_SEGMENT_BYTES`` when
    workers may fill the file in parallel. A file with a :class:`Crc32Segment` is one task: its
    CRC-32s accumulate as the bytes before it stream past, in order."""
    placed = list(zip(check_segments(plan.path, len(plan.header_bytes), plan.ops, plan.file_bytes), plan.ops))
    if not parallel or any(isinstance(seg, Crc32Segment) for seg in plan.ops):
        return [placed]
    out: list[list[tuple[int, Segment]]] = [[]]
    size = 0
    for pos, seg in placed:
        if out[-1] and size + seg.dst_nbytes > _SEGMENT_BYTES:
            out.append([])
            size = 0
        out[-1].append((pos, seg))
        size += seg.dst_nbytes
    return out


class _Crc32Ranges:
    """zlib CRC-32s of the byte ranges a file's :class:`Crc32Segment` list needs, fed with the
    file's bytes in order as they are written (one task per such file: no locking)."""

    def __init__(self, path: str, segments: Sequence[Segment]) -> None:
        wanted = sorted({r for seg in segments if isinstance(seg, Crc32Segment) for r in seg.ranges})
        for (s0, n0), (s1, _) in zip(wanted, wanted[1:]):
            if s0 + n0 > s1:
                raise SegmentPlanError(
                    f"{path}: CRC-32 ranges [{s0}, {s0 + n0}) and [{s1}, ...) overlap; plan disjoint ranges",
                    path=path,
                )
        self.path = path
        self.ranges = wanted
        self.starts = [s for s, _ in wanted]
        self.crc = {r: 0 for r in wanted}
        self.seen = {r: 0 for r in wanted}

    def feed(self, pos: int, data: memoryview | bytes) -> None:
        end = pos + len(data)
        i = max(0, bisect.bisect_right(self.starts, pos) - 1)
        while i < len(self.ranges) and self.ranges[i][0] < end:
            s, n = self.ranges[i]
            lo, hi = max(s, pos), min(s + n, end)
            if lo < hi:
                self.crc[(s, n)] = zlib.crc32(data[lo - pos: hi - pos], self.crc[(s, n)])
                self.seen[(s, n)] += hi - lo
            i += 1

    def values(self, seg: Crc32Segment) -> tuple[int, ...]:
        for r in seg.ranges:
            if self.seen[r] != r[1]:
                raise SegmentPlanError(
                    f"{self.path}: the CRC-32 of bytes [{r[0]}, {r[0] + r[1]}) was wanted after "
                    f"{self.seen[r]} of its {r[1]} bytes were written",
                    path=self.path, expected=r[1], actual=self.seen[r],
                )
        return tuple(self.crc[r] for r in seg.ranges)


class _Buffers(threading.local):
    """One read buffer and one cast buffer per worker thread, reused for every chunk: casting
    into a fresh tensor per chunk would leave the allocator's arenas growing with the work."""

    def __init__(self) -> None:
        self.buf: bytearray | None = None
        self.cast: bytearray | None = None

    def get(self, nbytes: int) -> bytearray:
        if self.buf is None or len(self.buf) < nbytes:
            self.buf = bytearray(nbytes)
        return self.buf

    def get_cast(self, nbytes: int) -> bytearray:
        if self.cast is None or len(self.cast) < nbytes:
            self.cast = bytearray(nbytes)
        return self.cast


def copy_op_into(
    op: CopyOp,
    src: Location,
    buffers: "_Buffers",
    chunk_bytes: int,
    emit: Callable[[int, memoryview], int | None],
    checks: SourceChecks | None,
    progress: ProgressTracker | None,
    via: str | None = None,
) -> None:
    """Stream one op in chunks: read, checksum the source piece, cast, hand to ``emit``.

    ``emit(dst_offset_within_op, data)`` writes the (cast) bytes. ``via``: cast to that dtype
    first (:class:`~zero_ckpt.segments.CastViaSegment`).
    """
    src_size = op.src_nbytes // op.numel if op.numel else 1
    dst_size = op.dst_nbytes // op.numel if op.numel else 1
    cast = op.src_dtype != op.dst_dtype or via is not None
    per_chunk = max(1, chunk_bytes // max(src_size, dst_size))
    done = 0
    while done < op.numel:
        n = min(per_chunk, op.numel - done)
        buf = buffers.get(per_chunk * src_size)
        view = memoryview(buf)[: n * src_size]
        src.read_into(op.src_file, op.src_start + done * src_size, view)
        if checks is not None and op.check_source:
            checks.add_read(op.src_file, op.src_tensor, op.src_offset + done * src_size, view)
        if cast:
            import torch

            values = torch.frombuffer(buf, dtype=_torch_dtype(op.src_dtype), count=n)
            if via is not None:
                values = values.to(_torch_dtype(via))
            cast_buf = buffers.get_cast(per_chunk * dst_size)
            torch.frombuffer(cast_buf, dtype=_torch_dtype(op.dst_dtype), count=n).copy_(values)
            out = memoryview(cast_buf)[: n * dst_size]
        else:
            out = view
        emit(done * dst_size, out)
        if progress is not None:
            progress.add(len(view))
        done += n


def run_file_plans(
    src: Location,
    dst: Location,
    plans: Sequence[FilePlan],
    *,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    progress: ProgressTracker | None = None,
    checks: SourceChecks | None = None,
    fsync: bool | None = None,
) -> dict[str, WrittenFile]:
    """Write every planned file to ``dst`` and commit each (temp + rename on local disk).

    On any error nothing planned is left at ``dst``: uncommitted files are aborted and the
    committed ones removed; the first error is raised.
    """
    chunk = chunk_bytes or knobs.chunk_bytes()
    nworkers = resolve_workers(workers, chunk, dst)
    buffers = _Buffers()
    jobs: list[_FileJob] = []
    tasks: list[tuple[_FileJob, list[tuple[int, Segment]], bool]] = []
    stop = threading.Event()
    # Positioned writes need a local or S3 destination and a known size (every plan has one).
    positioned = dst.supports_positioned_write
    try:
        for plan in plans:
            segments = _segments(plan, positioned)
            crcs = _Crc32Ranges(plan.path, plan.ops) if len(segments) == 1 and any(
                isinstance(seg, Crc32Segment) for seg in plan.ops) else None
            job = _FileJob(plan, dst, positioned, len(segments), crcs)
            jobs.append(job)
            for i, seg in enumerate(segments):
                tasks.append((job, seg, i == 0))

        def run(job: _FileJob, segs: list[tuple[int, Segment]], first: bool) -> None:
            if stop.is_set():
                return
            writer = job.open()
            positioned = job.positioned
            if positioned and not writer.supports_write_at:
                raise RuntimeError(f"{writer.url}: positioned writes are not supported here")
            crcs = job.crcs
            local_pieces: list[tuple[int, int, int]] = []
            local_tensor: list[tuple[str, int, int, int]] = []

            def put(pos: int, data: memoryview | bytes) -> int:
                if stop.is_set():  # another task failed or the user interrupted
                    raise _Stopped()
                crc = crc32c(data)
                if positioned:
                    writer.write_at(pos, data)
                else:
                    writer.write(data)
                local_pieces.append((pos, len(data), crc))
                if crcs is not None:
                    crcs.feed(pos, data)
                return crc

            if first and job.plan.header_bytes:
                put(0, job.plan.header_bytes)
            for pos, seg in segs:
                if stop.is_set():
                    return
                if isinstance(seg, (CopyOp, CastViaSegment)):
                    op = seg if isinstance(seg, CopyOp) else seg.op

                    def emit(rel: int, data: memoryview, op: CopyOp = op) -> None:
                        crc = put(op.dst_start + rel, data)
                        if op.dst_tensor is not None:
                            local_tensor.append((op.dst_tensor, op.dst_offset + rel, len(data), crc))

                    via = seg.via if isinstance(seg, CastViaSegment) else None
                    copy_op_into(op, src, buffers, chunk, emit, checks, progress, via=via)
                elif isinstance(seg, LiteralSegment):
                    if seg.data:
                        put(pos, seg.data)
                elif isinstance(seg, ZerosSegment):
                    done = 0
                    while done < seg.nbytes:
                        n = min(len(_ZEROS), seg.nbytes - done)
                        put(pos + done, memoryview(_ZEROS)[:n])
                        done += n
                else:  # Crc32Segment (check_segments refused anything else)
                    if crcs is None:
                        raise SegmentPlanError(f"{job.plan.path}: a CRC-32 segment was split from its file's bytes",
                                               path=job.plan.path)
                    data = seg.render(crcs.values(seg))
                    if len(data) != seg.nbytes:
                        raise SegmentPlanError(
                            f"{job.plan.path}: the CRC-32 segment at byte {pos} rendered {len(data)} bytes, "
                            f"planned {seg.nbytes}",
                            path=job.plan.path, expected=seg.nbytes, actual=len(data),
                        )
                    if data:
                        put(pos, data)
            with job.lock:
                for piece in local_pieces:
                    job.pieces.add(*piece)
                for name, off, n, crc in local_tensor:
                    job.tensor_pieces[name].add(off, n, crc)
                job.remaining -= 1
                last = job.remaining == 0
            if last:
                writer.commit(fsync=fsync)
                job.committed = True

        with ThreadPoolExecutor(max_workers=nworkers) as pool:
            futures = [pool.submit(run, *t) for t in tasks]
            try:
                done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:
                # KeyboardInterrupt (or another signal turned exception) in this thread: stop
                # the workers before the pool's exit waits for them, then abort below.
                stop.set()
                for f in futures:
                    f.cancel()
                raise
            failed = [f for f in done if f.exception() is not None and not isinstance(f.exception(), _Stopped)]
            if failed:
                stop.set()
                for f in pending:
                    f.cancel()
                wait(futures)
                raise failed[0].exception()  # type: ignore[misc]
        result = {}
        for job in jobs:
            header = job.plan.header
            tensor_crcs = (
                {
                    name: job.tensor_pieces[name].combine(entry.nbytes) if entry.nbytes else 0
                    for name, entry in header.tensors.items()
                }
                if header is not None
                else {}
            )
            result[job.plan.path] = WrittenFile(
                job.plan.path, job.plan.file_bytes, job.pieces.combine(job.plan.file_bytes), tensor_crcs
            )
        return result
    except BaseException:
        stop.set()
        for job in jobs:
            if job.committed:
                try:
                    dst.remove(job.plan.path)
                except CheckpointError:
                    pass
            else:
                job.abort()
        raise


def write_and_commit(
    src: Location,
    dst: Location,
    view: "SourceView",
    plans: Sequence[FilePlan],
    commit: Callable[[Mapping[str, WrittenFile]], None],
    *,
    precheck: Callable[[], None] | None = None,
    progress: ProgressTracker | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
) -> dict[str, WrittenFile]:
    """Every writer's tail: run ``plans`` from ``view``'s files, check the source bytes as they
    stream against what the view records (format v1's CRC32Cs; the zlib CRC-32 of zip records
    read whole), run ``precheck`` (the format's own check of its files) only if some byte the
    plans read was not covered that way, then ``commit(written)`` (the job's commit file:
    ``manifest.json``, ``latest``, ``.metadata``). CorruptShardError names every bad file. On
    any error the files this call wrote are removed and nothing is committed."""
    from zero_ckpt.errors import CorruptShardError, raise_problems

    checks = SourceChecks(zip_units=dict(view.checks.zip_units))
    written = run_file_plans(
        src, dst, plans, workers=workers, chunk_bytes=chunk_bytes, progress=progress,
        checks=checks, fsync=fsync,
    )
    try:
        raise_problems(
            checks.problems(src, view.checked_files, view.checks.headers, view.checks.header_crcs)
            + checks.zip_problems(src),
            CorruptShardError,
        )
        if precheck is not None and not checks.streamed_all(plans):
            precheck()
        commit(written)
    except BaseException:
        for rel in written:
            try:
                dst.remove(rel)
            except CheckpointError:
                pass  # the first error is the one to report
        raise
    return written
