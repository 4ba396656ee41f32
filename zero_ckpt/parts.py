"""Scale-out of offline jobs: ``reshard`` and ``consolidate`` split into parts, one final commit.

A job's plan is deterministic from the source manifest and the options, so every process can
compute it alone. Part ``i`` of ``n`` executes the output files that :func:`assign_parts`
gives it (a size-balanced, deterministic split of the plan's files; a file is the unit of
work, so a single huge output file is never split) and then:

1. verifies every source tensor it read completely itself (a corrupted byte stops the part,
   which removes what it wrote), and
2. writes its record, ``<dst>/_parts/<job>/part-0000i-of-0000n.json`` (atomically): what it
   wrote (path, bytes, CRC, tensor CRCs) and the CRC pieces of every source range it read.

The commit, once every part's record exists: merge the records, verify the source tensors
whose pieces were spread over several parts (the CRC pieces combine), write ``manifest.json``
(reshard) or the index/optimizer documents (consolidate), then remove ``_parts/<job>/``
(``job.json`` first: its absence tells a concurrent part that the commit happened). The
commit is idempotent: two parts that finish at once may both commit and write identical bytes.

Who commits:

- without a process group (``--part i/n`` on any hosts): each part, after writing its record,
  lists the records; the one that sees all ``n`` commits (ties commit twice, identically);
  the others report which parts they wait for (their output is not complete yet);
- distributed (``--distributed``, ``part="distributed"``: only when asked, never because
  torchrun's variables are set): ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` must
  all be set (SplitJobError before anything is written otherwise); the ranks join a gloo
  process group, waiting :func:`join_timeout_s` (300 s) for missing peers; records are still
  written (for resume) and exchanged, rank 0 commits, and the ranks agree on the outcome
  (:mod:`zero_ckpt.agreement`), so every rank returns (or raises) only after the commit.
  This is the only use of ``torch.distributed`` in the offline jobs, imported lazily.

Job id: a hash of the source manifest, the kind of job and its options (target world size;
dtype, max shard size, optimizer), the part count and the zero-ckpt version. Records of
different jobs never mix: a part refuses a destination holding another job's ``_parts/``.

Destination rules for a part (unsplit jobs keep :func:`~zero_ckpt.destination.prepare_destination`):

- files zero-ckpt does not write (see :mod:`zero_ckpt.destination`) are never touched; one
  inside a folder the job writes (``shards/`` of a reshard) is refused;
- without ``overwrite``: the destination must hold no zero-ckpt files, or hold
  ``_parts/<this job>/`` and otherwise only outputs of this job (other parts' finished files,
  their temporary files, a commit that crashed midway);
- with ``overwrite``: every part may pass it, concurrently: it deletes the zero-ckpt files
  that do not belong to this job (a stale ``manifest.json`` or documents first, other jobs'
  ``_parts/``, stale shards) and never this job's outputs or records, which may be another
  part's finished work. A finished job rerun with ``overwrite`` starts over: every part must
  run again;
- a destination claimed by an unsplit job (its ``zero-ckpt-incomplete.json`` marker) is
  refused while that job runs, or, without ``overwrite``, when it was interrupted.

Resume: a part whose record exists (and whose files still have their recorded sizes) skips
its files and goes straight to the commit step. To redo a job from scratch, empty the
destination first.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import posixpath
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, Mapping, Sequence

from zero_ckpt import knobs
from zero_ckpt.agreement import agree, agree_all
from zero_ckpt.checksum import crc32c_combine, format_checksum, parse_checksum
from zero_ckpt.errors import (
    CheckpointError,
    CorruptShardError,
    DestinationExistsError,
    MissingShardError,
    raise_problems,
)
from zero_ckpt.manifest import FileMeta, Manifest
from zero_ckpt.plan import FilePlan
from zero_ckpt.safetensors_format import SafetensorsHeader
from zero_ckpt.destination import CLAIM_NAME, check_claim, check_reads, is_tool_file, tool_files
from zero_ckpt.storage import Location, open_location
from zero_ckpt.transfer import (
    ProgressFn,
    ProgressTracker,
    SourceChecks,
    WrittenFile,
    run_file_plans,
)

__all__ = [
    "PARTS_DIR",
    "PartSpec",
    "PartJob",
    "PartWork",
    "PartResult",
    "assign_parts",
    "compact_pieces",
    "parse_part",
    "part_from_env",
    "resolve_part",
    "DISTRIBUTED",
    "SplitJobError",
    "join_timeout_s",
    "make_job",
    "run_part",
]

PARTS_DIR = "_parts"
JOB_FILE = "job.json"
_RECORD_FORMAT = "zero-ckpt-part"
_JOB_FORMAT = "zero-ckpt-job"
_RECORD_VERSION = 1


class SplitJobError(CheckpointError, ValueError):
    """A split job cannot run as asked: its environment is incomplete, or its peers did not
    join (or were lost) within the timeout. Nothing was committed."""


# ----- pure: which part does what -------------------------------------------------------------


@dataclass(frozen=True)
class PartSpec:
    """Part ``index`` of ``parts`` (0-based); ``from_env`` when taken from torchrun's env."""

    index: int
    parts: int
    from_env: bool = False

    def __post_init__(self) -> None:
        if self.parts < 1 or not 0 <= self.index < self.parts:
            raise ValueError(
                f"part {self.index}/{self.parts} is not valid: need 0 <= i < n, e.g. 0/4 ... 3/4"
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.parts}"


def assign_parts(costs: Sequence[int], parts: int) -> tuple[tuple[int, ...], ...]:
    """Split items ``0..len(costs)-1`` into ``parts`` groups of similar total cost.

    Greedy largest-first (LPT): items in order of decreasing cost (ties: lower index first)
    each go to the group with the least cost so far (ties: lower group). Deterministic; every
    item is in exactly one group; each group lists its items in increasing order; the most
    and least loaded groups differ by at most the largest cost. Pure.
    """
    if parts < 1:
        raise ValueError(f"the number of parts must be at least 1, got {parts}")
    if any(c < 0 for c in costs):
        raise ValueError("costs must be >= 0")
    heap = [(0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for item in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        load, p = heapq.heappop(heap)
        out[p].append(item)
        heapq.heappush(heap, (load + costs[item], p))
    return tuple(tuple(sorted(items)) for items in out)


def compact_pieces(pieces: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Merge contiguous ``(offset, length, crc)`` pieces into runs (CRCs combined). Pure.

    The pieces must not overlap; the result combines to the same CRC over any range they tile.
    """
    out: list[tuple[int, int, int]] = []
    for off, length, crc in sorted(pieces):
        if length == 0:
            continue
        if out and out[-1][0] + out[-1][1] == off:
            o, n, c = out[-1]
            out[-1] = (o, n + length, crc32c_combine(c, crc, length))
        else:
            if out and out[-1][0] + out[-1][1] > off:
                raise ValueError(f"checksum pieces overlap at byte {off}")
            out.append((off, length, crc))
    return out


def parse_part(text: str) -> PartSpec:
    """``"1/4"`` -> ``PartSpec(1, 4)``; ValueError naming the expected form otherwise."""
    i, sep, n = str(text).strip().partition("/")
    try:
        if not sep:
            raise ValueError
        return PartSpec(int(i), int(n))
    except ValueError:
        raise ValueError(
            f"part {text!r} is not of the form I/N with 0 <= I < N (e.g. 0/4)"
        ) from None


def part_from_env(env: Mapping[str, str] | None = None) -> PartSpec | None:
    """``PartSpec(RANK, WORLD_SIZE, from_env=True)`` when both are set (torchrun), else None.

    Only consulted when a caller asks for a split job from the environment (``part=
    "distributed"`` or ``"auto"``): torchrun's variables alone never split a job.
    SplitJobError when they are set but do not name a part.
    """
    env = os.environ if env is None else env
    rank, world = env.get("RANK"), env.get("WORLD_SIZE")
    if not rank or not world:
        return None
    try:
        return PartSpec(int(rank), int(world), from_env=True)
    except ValueError:
        raise SplitJobError(
            f"RANK={rank!r} and WORLD_SIZE={world!r} do not name a part (need 0 <= RANK < "
            "WORLD_SIZE); fix the environment or pass the part explicitly with --part I/N",
            actual=(rank, world),
        ) from None


DISTRIBUTED = "distributed"
_GROUP_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def resolve_part(part: Any, env: Mapping[str, str] | None = None) -> PartSpec | None:
    """The ``part=`` argument of ``reshard_part``/``consolidate_part`` as a PartSpec, or None for the whole job.

    ``None``: the whole job in this process (whatever the environment holds); ``(i, n)``,
    ``"i/n"`` or a PartSpec: that part, committed by whichever part finishes last (no process
    group); ``"distributed"``: this process is rank ``RANK`` of a torchrun launch of
    ``WORLD_SIZE`` ranks joined in a gloo group at ``MASTER_ADDR:MASTER_PORT`` (rank 0
    commits). SplitJobError, before anything is read or written, when one of those four
    variables is missing. ``"auto"``: ``"distributed"`` when RANK and WORLD_SIZE are set,
    else the whole job (kept for library callers; the CLI never passes it).
    """
    if part is None or isinstance(part, PartSpec):
        return part
    if part == "auto":
        env_ = os.environ if env is None else env
        if not env_.get("RANK") or not env_.get("WORLD_SIZE"):
            return None
        part = DISTRIBUTED
    if part == DISTRIBUTED:
        env_ = os.environ if env is None else env
        missing = [k for k in _GROUP_ENV if not env_.get(k)]
        if missing:
            raise SplitJobError(
                f"a distributed job needs torchrun's environment, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set; launch it with `torchrun "
                "--nproc-per-node N zero-ckpt ... --distributed` (every rank runs the same "
                "command), or pass --part I/N to run one part without a process group",
                actual=missing,
            )
        return part_from_env(env_)
    if isinstance(part, str):
        return parse_part(part)
    if isinstance(part, tuple) and len(part) == 2 and all(isinstance(x, int) for x in part):
        return PartSpec(part[0], part[1])
    raise ValueError(
        f"part must be None, 'distributed', 'auto', 'i/n' or a tuple (i, n), got {part!r}"
    )


@dataclass(frozen=True)
class PartJob:
    """What a split job is, as far as its output is concerned; ``id`` names its records."""

    kind: str
    options: dict[str, Any]
    source: str  # sha256 of the source manifest
    parts: int
    version: str
    summary: str = ""  # for messages only (not part of the id)

    @property
    def id(self) -> str:
        key = {"kind": self.kind, "options": self.options, "source": self.source,
               "parts": self.parts, "version": self.version}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def dir(self) -> str:
        return f"{PARTS_DIR}/{self.id}"

    def record_path(self, index: int) -> str:
        return f"{self.dir}/part-{index:05d}-of-{self.parts:05d}.json"

    def describe(self) -> str:
        return f"{self.summary or self.kind} in {self.parts} parts, source manifest {self.source[:12]}"

    def to_json(self) -> bytes:
        doc = {"format": _JOB_FORMAT, "version": _RECORD_VERSION, "job": self.id,
               "kind": self.kind, "options": self.options, "source": self.source,
               "parts": self.parts, "zero_ckpt": self.version, "summary": self.summary}
        return (json.dumps(doc, indent=1) + "\n").encode()


def make_job(kind: str, options: Mapping[str, Any], source: Manifest, parts: int,
             version: str, summary: str = "") -> PartJob:
    digest = hashlib.sha256(source.to_json().encode()).hexdigest()
    return PartJob(kind, dict(options), digest, parts, version, summary)


# ----- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    job: str
    part: int
    parts: int
    files: tuple[WrittenFile, ...]
    # (source file, tensor or None for a raw copy, compacted (offset, length, crc) pieces)
    pieces: tuple[tuple[str, str | None, tuple[tuple[int, int, int], ...]], ...]

    def to_json(self) -> bytes:
        doc = {
            "format": _RECORD_FORMAT,
            "version": _RECORD_VERSION,
            "job": self.job,
            "part": self.part,
            "parts": self.parts,
            "files": [
                {"path": w.path, "bytes": w.bytes, "crc": format_checksum(w.crc),
                 "tensors": {k: format_checksum(v) for k, v in w.tensor_crcs.items()}}
                for w in self.files
            ],
            "source_pieces": [
                {"file": f, "tensor": t, "pieces": [list(p) for p in ps]}
                for f, t, ps in self.pieces
            ],
        }
        return (json.dumps(doc) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, url: str) -> "_Record":
        try:
            doc = json.loads(data)
            if doc.get("format") != _RECORD_FORMAT or doc.get("version") != _RECORD_VERSION:
                raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}")
            files = tuple(
                WrittenFile(f["path"], int(f["bytes"]), parse_checksum(f["crc"]),
                            {k: parse_checksum(v) for k, v in f["tensors"].items()})
                for f in doc["files"]
            )
            pieces = tuple(
                (p["file"], p["tensor"], tuple((int(a), int(b), int(c)) for a, b, c in p["pieces"]))
                for p in doc["source_pieces"]
            )
            return cls(str(doc["job"]), int(doc["part"]), int(doc["parts"]), files, pieces)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{url}: not a readable part record ({exc}); delete it and run that part again",
                path=url,
            ) from None


def _record_of(job: PartJob, index: int, written: Sequence[WrittenFile], checks: SourceChecks) -> _Record:
    pieces = tuple(
        (file, tensor, tuple(compact_pieces(pc.pieces)))
        for (file, tensor), pc in sorted(checks.pieces.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
        if pc.pieces
    )
    return _Record(job.id, index, job.parts, tuple(written), pieces)


# ----- execution -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PartWork:
    """A job's plan as ``reshard_part``/``consolidate_part`` hand it to :func:`run_part`.

    ``files``: the whole plan's output files; ``commit_outputs``: names written at commit
    (``manifest.json``, documents); ``source_files``/``source_headers`` (by path)/
    ``header_crcs``: what :meth:`SourceChecks.problems` needs; ``commit(written)`` writes the
    commit outputs from every file's :class:`WrittenFile` (it must be deterministic).
    """

    job: PartJob
    files: tuple[FilePlan, ...]
    commit_outputs: tuple[str, ...]
    source_files: tuple[FileMeta, ...]
    source_headers: Mapping[str, SafetensorsHeader]
    header_crcs: Mapping[str, int]
    commit: Callable[[Mapping[str, WrittenFile]], None]


@dataclass(frozen=True)
class PartResult:
    """What one part did. ``files``: the outputs this part is responsible for (written now,
    or found from an earlier run when ``resumed``), ``bytes`` their size; ``committed``: the
    whole job is complete (``committed_by``: the part that committed, when known);
    ``waiting_for``: parts whose records are still missing; ``outputs``: every file of the
    finished job; ``manifest``: the new checkpoint's manifest (reshard, once committed)."""

    job: str
    part: int
    parts: int
    dst: str
    files: tuple[str, ...]
    bytes: int
    resumed: bool = False
    committed: bool = False
    committed_by: int | None = None
    waiting_for: tuple[int, ...] = ()
    outputs: tuple[str, ...] = ()
    manifest: Manifest | None = field(default=None, compare=False)


def _cost(f: FilePlan) -> int:
    # bytes read plus bytes written: what a part spends its time on
    return f.file_bytes + sum(op.src_nbytes for op in f.ops)


def run_part(
    spec: PartSpec,
    src: Location,
    dst: Location,
    setup: Callable[[], PartWork],
    *,
    overwrite: bool = False,
    workers: int | None = None,
    chunk_bytes: int | None = None,
    fsync: bool | None = None,
    progress: ProgressFn | None = None,
) -> PartResult:
    """Run part ``spec`` of the job ``setup()`` plans, then commit if it is the last one.

    Under torchrun (``spec.from_env`` and ``MASTER_ADDR``/``MASTER_PORT`` set) this is a
    collective: every rank must call it; rank 0 commits and all return after the commit.
    """
    group = _Group.open(spec)
    if group is None:
        work, mine, record, resumed = _run_local(spec, src, dst, setup, overwrite, workers, chunk_bytes, fsync, progress)
        return _finish_with_records(spec, src, dst, work, mine, record, resumed)
    try:
        return _run_grouped(group, spec, src, dst, setup, overwrite, workers, chunk_bytes, fsync, progress)
    finally:
        group.close()


def _run_local(spec, src, dst, setup, overwrite, workers, chunk_bytes, fsync, progress):
    work = setup()
    job = work.job
    if job.parts != spec.parts:
        raise ValueError(f"internal: job planned for {job.parts} parts, part {spec}")
    _check_destination(src, dst, work, overwrite)
    dst.write_atomic(f"{job.dir}/{JOB_FILE}", job.to_json())
    foreign = _foreign_jobs(dst, job)
    if foreign:  # another job claimed the destination at the same moment
        raise _foreign_error(dst, job, foreign)
    mine = [work.files[k] for k in assign_parts([_cost(f) for f in work.files], spec.parts)[spec.index]]
    record = _resume(dst, job, spec.index, mine)
    if record is not None:
        return work, mine, record, True
    checks = SourceChecks()
    tracker = ProgressTracker(progress, sum(op.src_nbytes for f in mine for op in f.ops))
    written = run_file_plans(
        src, dst, mine, workers=workers, chunk_bytes=chunk_bytes, progress=tracker,
        checks=checks, fsync=fsync,
    )
    try:
        # tensors this part read completely are checked now; the rest at the commit
        problems = checks.problems(src, work.source_files, work.source_headers, work.header_crcs)
        raise_problems(problems, CorruptShardError)
        record = _record_of(job, spec.index, [written[f.path] for f in mine], checks)
        dst.write_atomic(job.record_path(spec.index), record.to_json())
    except BaseException:
        for path in written:
            dst.remove(path)
        raise
    return work, mine, record, False


def _resume(dst: Location, job: PartJob, index: int, mine: Sequence[FilePlan]) -> _Record | None:
    rel = job.record_path(index)
    if not dst.exists(rel):
        return None
    try:
        record = _Record.from_json(dst.read_bytes(rel), dst.url_of(rel))
    except CheckpointError:
        return None  # unreadable: redo the part, its new record replaces this one
    if record.job != job.id or record.part != index or [w.path for w in record.files] != [f.path for f in mine]:
        return None
    for w, f in zip(record.files, mine):
        if w.bytes != f.file_bytes or not dst.exists(w.path) or dst.size(w.path) != w.bytes:
            return None
    return record


def _result(spec: PartSpec, dst: Location, work: PartWork, mine: Sequence[FilePlan], resumed: bool, **kw: Any) -> PartResult:
    outputs = tuple(f.path for f in work.files) + tuple(work.commit_outputs) if kw.get("committed") else ()
    return PartResult(
        work.job.id, spec.index, spec.parts, dst.url, tuple(f.path for f in mine),
        sum(f.file_bytes for f in mine), resumed, outputs=outputs, **kw,
    )


def _finish_with_records(spec, src, dst, work, mine, record, resumed) -> PartResult:
    """No process group: commit if every record is there, else say which are missing."""
    job = work.job
    for _attempt in range(2):
        present = _listing(dst, job.dir)
        if JOB_FILE not in present:  # removed only by a commit, which another part made
            _check_committed(dst, work)
            return _result(spec, dst, work, mine, resumed, committed=True)
        names = {posixpath.basename(job.record_path(k)): k for k in range(job.parts)}
        missing = tuple(k for name, k in names.items() if name not in present)
        if missing:
            return _result(spec, dst, work, mine, resumed, waiting_for=missing)
        try:
            records = [
                record if k == spec.index else _read_record(dst, job, k) for k in range(job.parts)
            ]
        except MissingShardError:
            continue  # a concurrent commit is removing the records: look again
        _commit(src, dst, work, records)
        return _result(spec, dst, work, mine, resumed, committed=True, committed_by=spec.index)
    _check_committed(dst, work)
    return _result(spec, dst, work, mine, resumed, committed=True)


def _check_committed(dst: Location, work: PartWork) -> None:
    """The job's records are gone: make sure that is because its output is complete (and
    not because another job's ``overwrite`` took the destination over)."""
    missing = ({f.path for f in work.files} | set(work.commit_outputs)) - set(dst.list_files())
    if missing:
        raise CheckpointError(
            f"{dst.url_of(work.job.dir)} disappeared before job {work.job.id} was committed and "
            f"{dst.url} lacks {sorted(missing)[0]!r}: did another job take the destination "
            "over (overwrite)? Run every part of this job again",
            path=dst.url,
        )


def _read_record(dst: Location, job: PartJob, index: int) -> _Record:
    rel = job.record_path(index)
    return _Record.from_json(dst.read_bytes(rel), dst.url_of(rel))


def _commit(src: Location, dst: Location, work: PartWork, records: Sequence[_Record]) -> None:
    """Merge every part's record, verify the pooled source pieces, write the commit outputs
    and remove the job's records. Idempotent."""
    job = work.job
    where = dst.url_of(job.dir)
    for k, r in enumerate(records):
        if (r.job, r.part, r.parts) != (job.id, k, job.parts):
            raise CheckpointError(
                f"{where}: the record of part {k} belongs to job {r.job} part {r.part}/{r.parts}, "
                f"not {job.id}; delete {where} and run every part again",
                path=where,
            )
    written: dict[str, WrittenFile] = {}
    for r in records:
        for w in r.files:
            if w.path in written:
                raise CheckpointError(f"{where}: {w.path} is in two parts' records; delete "
                                      f"{where} and run every part again", path=where)
            written[w.path] = w
    planned = {f.path: f.file_bytes for f in work.files}
    if {p: w.bytes for p, w in written.items()} != planned:
        raise CheckpointError(
            f"{where}: the parts' records do not cover the plan's {len(planned)} files exactly; "
            f"delete {where} and run every part again",
            path=where,
        )
    checks = SourceChecks()
    for r in records:
        for file, tensor, pieces in r.pieces:
            for off, length, crc in pieces:
                checks.add(file, tensor, off, length, crc)
    _check_coverage(work, checks, where)
    problems = checks.problems(src, work.source_files, work.source_headers, work.header_crcs)
    if problems:
        # The outputs carry corrupted bytes: remove the whole job (every part's files), so a
        # rerun after the source is repaired starts from scratch instead of resuming.
        for path in [*work.commit_outputs, *planned]:
            dst.remove(path)
        _remove_job(dst, job)
        raise_problems(problems, CorruptShardError)
    work.commit(written)
    _remove_job(dst, job)


def _check_coverage(work: PartWork, checks: SourceChecks, where: str) -> None:
    """The pooled pieces must cover exactly what the plan reads (else a record is stale)."""
    expected: dict[tuple[str, str | None], int] = {}
    for f in work.files:
        for op in f.ops:
            if op.check_source and op.numel:
                key = (op.src_file, op.src_tensor)
                expected[key] = expected.get(key, 0) + op.src_nbytes
    got = {key: pc.covered() for key, pc in checks.pieces.items() if pc.covered()}
    if got != expected:
        raise CheckpointError(
            f"{where}: the parts' records do not cover the source ranges the plan reads; "
            f"delete {where} and run every part again",
            path=where,
        )


def _remove_job(dst: Location, job: PartJob) -> None:
    # job.json first: a part that finds it gone knows the job was committed.
    dst.remove(f"{job.dir}/{JOB_FILE}")
    for k in range(job.parts):
        dst.remove(job.record_path(k))
    for rel in (job.dir, PARTS_DIR):
        _remove_empty_dir(dst, rel)


def _remove_empty_dir(loc: Location, rel: str) -> None:
    # Local disk keeps empty directories after their files are removed; object stores (and
    # fsspec's memory filesystem, for listing purposes) have none to tidy.
    if loc.local_path() is None:
        return
    try:
        os.rmdir(loc.path_of(rel))
    except OSError:  # not empty (another job's parts) or already gone: leave it
        pass


def _listing(loc: Location, rel: str) -> list[str]:
    """Files under ``rel`` (relative to it)."""
    with open_location(loc.url_of(rel), loc.storage_options) as sub:
        return sub.list_files()


# ----- the destination -----------------------------------------------------------------------


def _is_output(rel: str, outputs: set[str]) -> bool:
    if rel in outputs:
        return True
    # a local writer's temporary sibling ".<name>.tmp-<id>" of an output (another part's
    # file being written right now)
    head, base = posixpath.split(rel)
    if base.startswith(".") and ".tmp-" in base:
        return posixpath.join(head, base[1:].rsplit(".tmp-", 1)[0]) in outputs
    return False


def _job_dir_of(rel: str) -> str | None:
    if rel.startswith(PARTS_DIR + "/"):
        return rel.split("/")[1] if rel.count("/") >= 2 else rel[len(PARTS_DIR) + 1:]
    return None


def _foreign_jobs(dst: Location, job: PartJob) -> list[str]:
    return sorted({
        d for rel in _listing(dst, PARTS_DIR)
        if (d := rel.split("/")[0] if "/" in rel else rel) != job.id
    })


def _foreign_error(dst: Location, job: PartJob, foreign: list[str]) -> DestinationExistsError:
    other = foreign[0]
    try:
        doc = json.loads(dst.read_bytes(f"{PARTS_DIR}/{other}/{JOB_FILE}"))
        what = f"{doc.get('summary') or doc.get('kind')} in {doc.get('parts')} parts, source manifest {str(doc.get('source'))[:12]}"
    except Exception:  # noqa: BLE001 - the description is a courtesy
        what = "unknown"
    url = dst.url_of(f"{PARTS_DIR}/{other}")
    return DestinationExistsError(
        f"{url} holds the parts of another job ({what}); this part belongs to job {job.id} "
        f"({job.describe()}): use the same source, options and part count as that job, "
        "another destination, or pass --overwrite (overwrite=True) to discard the other job",
        path=url,
    )


def _check_destination(src: Location, dst: Location, work: PartWork, overwrite: bool) -> None:
    """A part's destination rules (see the module doc); foreign files (neither zero-ckpt
    names nor this job's outputs) are never touched, and refused only inside a folder the job
    writes (``shards/`` of a reshard)."""
    job = work.job
    # parts cannot use prepare_destination: others may be writing
    check_reads(dst, sources=(src,), files=[(src, f.path) for f in work.source_files])
    files = dst.list_files()
    if CLAIM_NAME in files:
        check_claim(dst, overwrite)  # an unsplit job holds it (or was interrupted)
    outputs = {f.path for f in work.files} | set(work.commit_outputs)
    folders = ("shards",) if job.kind == "reshard" else ()
    ours = [rel for rel in files if _job_dir_of(rel) == job.id]
    tool = [rel for rel in tool_files(files, outputs) if _job_dir_of(rel) != job.id]
    others = [rel for rel in tool if not _is_output(rel, outputs)]
    strangers = [
        rel for rel in files
        if not is_tool_file(rel, outputs) and "/" in rel and rel.split("/", 1)[0] in folders
    ]
    if strangers:
        raise DestinationExistsError(
            f"{dst.url_of(strangers[0])} is not a file zero-ckpt writes but lies in "
            f"{strangers[0].split('/', 1)[0]}/, which this job writes; move it out of {dst.url} "
            "or choose another destination",
            path=dst.url_of(strangers[0]),
        )
    if overwrite:
        if not ours:  # a stale "complete" marker goes first, as in prepare_destination
            for name in work.commit_outputs:
                dst.remove(name)
        for rel in others:  # commit points first (tool_files' order)
            dst.remove(rel)
        dst.makedirs()
        return
    foreign_jobs = sorted({d for rel in files if (d := _job_dir_of(rel)) not in (None, job.id)})
    if foreign_jobs:
        raise _foreign_error(dst, job, foreign_jobs)
    if tool and not ours:
        raise DestinationExistsError(
            f"destination {dst.url} already exists and is not empty: it holds zero-ckpt output "
            f"({tool[0]!r}) and no parts of job {job.id}; choose a new path or pass --overwrite "
            "(overwrite=True) to replace it (files zero-ckpt does not write are kept)",
            path=dst.url_of(tool[0]),
        )
    if others:
        raise DestinationExistsError(
            f"destination {dst.url} holds parts of job {job.id} but also {others[0]!r}"
            f"{f' and {len(others) - 1} more files' if len(others) > 1 else ''} that no "
            "part of it writes; remove them or pass --overwrite (overwrite=True)",
            path=dst.url_of(others[0]),
        )
    dst.makedirs()


# ----- torchrun: a gloo process group ----------------------------------------------------------


_JOIN_TIMEOUT_ENV = "ZERO_CKPT_PART_JOIN_TIMEOUT_S"
_JOIN_TIMEOUT_DEFAULT_S = 300
_opened_groups = 0  # one join key space per group this process opens (same order on every rank)


def join_timeout_s(env: Mapping[str, str] | None = None) -> int:
    """How long a distributed split job's ranks wait for each other to *join*, in seconds
    (ZERO_CKPT_PART_JOIN_TIMEOUT_S, default 300): a rank that never starts (a typo in the
    launch, a dead host) fails the others after this, with a message naming the missing ranks.
    Once every rank has joined, waiting for a slow peer's work is bounded by
    ZERO_CKPT_PART_TIMEOUT_S (:func:`zero_ckpt.knobs.part_timeout_s`)."""
    env = os.environ if env is None else env
    raw = env.get(_JOIN_TIMEOUT_ENV, "").strip()
    if not raw:
        return _JOIN_TIMEOUT_DEFAULT_S
    try:
        value = int(raw)
        if value < 1:
            raise ValueError
    except ValueError:
        raise SplitJobError(
            f"{_JOIN_TIMEOUT_ENV}={raw!r} is not a whole number of seconds of at least 1; "
            f"unset it for the default ({_JOIN_TIMEOUT_DEFAULT_S}) or set e.g. 600",
            actual=raw,
        ) from None
    return value


class _Group:
    """The job's gloo process group (created here, or a gloo group beside an existing one)."""

    def __init__(self, dist: Any, group: Any, created_default: bool, spec: PartSpec | None = None) -> None:
        self.dist = dist
        self.group = group
        self.created_default = created_default
        self.spec = spec

    @classmethod
    def open(cls, spec: PartSpec) -> "_Group | None":
        """None for a part without a process group (``--part``); else join the torchrun
        ranks. SplitJobError when torch.distributed is unavailable or a peer does not join
        within :func:`join_timeout_s` (nothing has been written by then)."""
        if not spec.from_env:
            return None
        try:
            import torch.distributed as dist
        except ImportError:
            dist = None
        if dist is None or not dist.is_available():
            raise SplitJobError(
                f"part {spec} of a distributed job needs torch.distributed, which this torch "
                "build lacks; install a torch with distributed support or pass --part I/N"
            )
        work = timedelta(seconds=knobs.part_timeout_s())
        if dist.is_initialized():
            if (dist.get_rank(), dist.get_world_size()) != (spec.index, spec.parts):
                raise SplitJobError(
                    f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                    f"but RANK/WORLD_SIZE say part {spec}; run the job with the group's ranks",
                    expected=str(spec), actual=(dist.get_rank(), dist.get_world_size()),
                )
            return cls(dist, dist.new_group(backend="gloo", timeout=work), False, spec)
        global _opened_groups
        _opened_groups += 1
        join = join_timeout_s()
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        hint = (
            f"start all {spec.parts} ranks with the same command (torchrun --nproc-per-node "
            f"{spec.parts} ... --distributed), raise {_JOIN_TIMEOUT_ENV} (now {join} s), or "
            "drop --distributed to run the whole job in one process"
        )
        try:
            store, _, _ = next(dist.rendezvous("env://", spec.index, spec.parts, timeout=timedelta(seconds=join)))
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/DistError/ValueError here
            raise SplitJobError(
                f"part {spec} of the distributed job could not join the other ranks at {where} "
                f"within {join} s ({_first_line(exc)}); nothing was written: {hint}",
                actual=where,
            ) from None
        # torchelastic may keep its store across restarts: a restart's keys must not meet
        # the previous attempt's (a stale "joined" would hide a missing peer).
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefix = f"zero-ckpt/{restart}/{_opened_groups}"
        keys = [f"{prefix}/joined/{k}" for k in range(spec.parts)]
        try:
            store.set(keys[spec.index], b"1")
            store.wait(keys, timedelta(seconds=join))
        except Exception as exc:  # noqa: BLE001 - a store timeout is a RuntimeError/DistError
            missing = [k for k, key in enumerate(keys) if not _store_has(store, key)]
            who = f"rank(s) {', '.join(map(str, missing))}" if missing else "some ranks"
            raise SplitJobError(
                f"part {spec} of the distributed job waited {join} s at {where} but {who} of "
                f"{spec.parts} never joined ({_first_line(exc)}); nothing was written: {hint}",
                actual=missing,
            ) from None
        store.set_timeout(work)
        dist.init_process_group(
            "gloo", store=dist.PrefixStore(f"{prefix}/pg", store), rank=spec.index,
            world_size=spec.parts, timeout=work,
        )
        return cls(dist, None, True, spec)

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.dist.get_world_size(self.group)
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        if self.created_default:
            self.dist.destroy_process_group()
        elif self.group is not None:
            self.dist.destroy_process_group(self.group)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _store_has(store: Any, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except Exception:  # noqa: BLE001 - the store itself may be gone
        return False


def _exchange(group: _Group, spec: PartSpec, dst: Location, what: str) -> Callable[[Any], list[Any]]:
    """The agreement's exchange over the job's group: a lost or timed-out peer becomes a
    SplitJobError (this rank's own failure, when it had one, is raised instead: the
    agreement sees to that)."""

    def exchange(obj: Any) -> list[Any]:
        try:
            return group.all_gather(obj)
        except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError/DistError subclasses
            raise _lost_peers(exc, spec, dst, what) from None

    return exchange


def _lost_peers(exc: BaseException, spec: PartSpec, dst: Location, what: str) -> SplitJobError:
    return SplitJobError(
        f"part {spec} of the distributed job lost the other ranks while waiting for {what} "
        f"({_first_line(exc)}); the job was not committed, so {dst.url} is incomplete: run "
        f"all {spec.parts} ranks again (finished parts resume from their records under "
        f"{dst.url_of(PARTS_DIR)}; ZERO_CKPT_PART_TIMEOUT_S bounds the wait, now "
        f"{knobs.part_timeout_s()} s)",
        path=dst.url,
    )


def _run_grouped(group: _Group, spec, src, dst, setup, overwrite, workers, chunk_bytes, fsync, progress) -> PartResult:
    """Collective: every rank runs its part and the ranks agree on the outcome, exchanging
    their records; rank 0 commits and the ranks agree again (so no rank returns before the
    commit). A failure raises on every rank (:func:`zero_ckpt.agreement.agree`): the failed
    rank's own error there, the same class elsewhere."""
    local: list[Any] = []

    def run() -> str:
        local[:] = _run_local(spec, src, dst, setup, overwrite, workers, chunk_bytes, fsync, progress)
        return local[2].to_json()

    texts = agree_all(
        "running the parts",
        run,
        exchange=_exchange(group, spec, dst, "their parts"),
        describe=lambda k, f: f"part {k}/{spec.parts} failed, so the job was not committed: {f.message}",
    )
    work, mine, _, resumed = local

    def commit() -> None:
        if spec.index == 0:
            records = [_Record.from_json(t, dst.url_of(work.job.record_path(k))) for k, t in enumerate(texts)]
            _commit(src, dst, work, records)

    agree("committing the job", commit, exchange=_exchange(group, spec, dst, "rank 0's commit"),
          describe=lambda k, f: f.message)
    return _result(spec, dst, work, mine, resumed, committed=True, committed_by=0)
