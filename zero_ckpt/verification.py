"""``verify``: read every file of a checkpoint once and report everything that is wrong."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from zero_ckpt import knobs
from zero_ckpt.checks import check_shard_header
from zero_ckpt.checksum import PieceChecksums, crc32c, parse_checksum
from zero_ckpt.formats import detect_location_format
from zero_ckpt.errors import CheckpointError, Problem
from zero_ckpt.manifest import MANIFEST_NAME, FileMeta, Manifest
from zero_ckpt.storage import Location, open_location
from zero_ckpt.transfer import ProgressFn, ProgressTracker, load_manifest, read_header, resolve_workers

__all__ = ["verify", "VerifyReport", "CHECKSUMS", "ZIP_CRC32"]


CHECKSUMS = "checksums"
ZIP_CRC32 = "zip-crc32"


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`: ``problems`` (empty when sound), and what was read.

    ``files_checked``/``bytes_checked``: files and bytes read and compared. ``method`` says
    against what: ``"checksums"`` (format v1: sizes, headers and the manifest's CRC32C of
    every file and tensor) or ``"zip-crc32"`` (DeepSpeed: no checksums of its own, so the
    files' structure, sizes and layout are cross-checked and every byte is compared with the
    CRC-32 that ``torch.save``'s zip format stores per record). ``format``: the checkpoint's.
    """

    url: str
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    manifest: Manifest | None = None
    notes: list[str] = field(default_factory=list)
    method: str = CHECKSUMS
    format: str = "zero-ckpt"

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    src: str,
    *,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
    workers: int | None = None,
    chunk_bytes: int | None = None,
) -> VerifyReport:
    """Check the checkpoint at ``src``: manifest consistent, every shard and the model file
    present, of the recorded size, with headers matching the layout and checksums (whole file
    and per tensor) matching. A run directory whose ``latest`` names a format-v1 checkpoint
    verifies that one (a note says so); a DeepSpeed folder is checked as ``_verify_deepspeed``
    says. Returns every problem found; raises only for storage failures that prevent reading
    at all."""
    from zero_ckpt.destination import read_claim
    from zero_ckpt.runs import latest_zero_ckpt

    chunk = chunk_bytes or knobs.chunk_bytes()
    with open_location(src, storage_options) as probe:
        try:
            resolved = latest_zero_ckpt(probe)
        except CheckpointError:  # unreadable: reading the manifest below reports it
            resolved = None
    report = VerifyReport(resolved or src)
    if resolved is not None:
        report.notes.append(
            f"{src} is a run directory: verified {resolved}, which its latest file names"
        )
    with open_location(resolved or src, storage_options) as loc:
        try:
            if detect_location_format(loc) == "deepspeed":
                return _verify_deepspeed(loc, report, chunk, progress)
        except CheckpointError as exc:
            message = str(exc).removeprefix(loc.url + ": ").removeprefix(loc.url + " ")
            report.problems.append(Problem(loc.url, message, "format"))
            return report
        claim = read_claim(loc)
        if claim is not None:
            state = "is still writing it" if claim.live else (
                "was interrupted" if claim.live is False else "is writing it or was interrupted")
            report.problems.append(Problem(
                claim.url,
                f"incomplete output: {claim.describe()} {state}; run the job again with "
                "--overwrite to complete it",
                "incomplete",
            ))
        try:
            manifest = load_manifest(loc)
        except CheckpointError as exc:
            kind = "incomplete" if isinstance(exc, FileNotFoundError) else "manifest"
            url = loc.url_of(MANIFEST_NAME)
            report.problems.append(Problem(url, str(exc).removeprefix(url + ": "), kind))
            return report
        report.manifest = manifest
        files = list(manifest.shards) + ([manifest.model_file] if manifest.model_file else [])
        tracker = ProgressTracker(progress, sum(f.bytes for f in files))
        with ThreadPoolExecutor(max_workers=resolve_workers(workers, chunk)) as pool:
            results = list(pool.map(lambda f: _verify_file(loc, manifest, f, chunk, tracker), files))
        for problems, nbytes in results:
            report.problems += problems
            report.bytes_checked += nbytes
            report.files_checked += 1
    return report


def _verify_deepspeed(
    loc: Location, report: VerifyReport, chunk: int, progress: ProgressFn | None
) -> VerifyReport:
    """DeepSpeed records no checksums: check the structure (reading the view checks every
    file is present, parses, agrees with the others and locates each range inside its file),
    then read every byte of every file once and compare each zip record with the CRC-32 the
    zip's central directory holds for it (``torch.save`` writes one per record)."""
    from zero_ckpt.formats.deepspeed import read_deepspeed

    report.format, report.method = "deepspeed", ZIP_CRC32
    try:
        view = read_deepspeed(loc)
    except CheckpointError as exc:
        report.problems.append(Problem(exc.path or loc.url, str(exc), "structure", exc.rank))
        return report
    report.manifest = view.manifest
    files = [*view.manifest.shards, *([view.manifest.model_file] if view.manifest.model_file else [])]
    sizes = {}
    for meta in files:
        try:
            sizes[meta.path] = loc.size(meta.path)
        except CheckpointError as exc:
            report.problems.append(Problem(loc.url_of(meta.path), str(exc), "missing", meta.rank))
    tracker = ProgressTracker(progress, sum(sizes.values()))
    for meta in files:
        if meta.path not in sizes:
            continue
        problems, nbytes = _verify_zip_crcs(loc, meta, sizes[meta.path], chunk, tracker)
        report.problems += problems
        report.bytes_checked += nbytes
        report.files_checked += 1
    report.notes.append(
        "DeepSpeed checkpoint: structure, sizes and layout cross-checked, and every byte "
        "compared with the zip CRC-32 torch.save stores per record (DeepSpeed itself records "
        "no checksums; convert it to get zero-ckpt's)"
    )
    return report


def _verify_zip_crcs(
    loc: Location, meta: FileMeta, size: int, chunk: int, tracker: ProgressTracker
) -> tuple[list[Problem], int]:
    """Stream one ``torch.save`` zip file; every stored record's bytes against its CRC-32."""
    from zero_ckpt.formats.torch_zip import crc_failure_message, zip_crc_failures

    url = loc.url_of(meta.path)
    try:
        bad = zip_crc_failures(loc, meta.path, chunk, tracker.add)
    except CheckpointError as exc:
        kind = "size" if "short" in str(exc) or "truncated" in str(exc) else "structure"
        message = str(exc).removeprefix(url + ": ").removeprefix(url + " ")
        return [Problem(url, message, kind, meta.rank)], 0
    if not bad:
        return [], size
    return [Problem(url, crc_failure_message(bad), "checksum", meta.rank)], size


def _verify_file(
    loc: Location, manifest: Manifest, meta: FileMeta, chunk: int, tracker: ProgressTracker
) -> tuple[list[Problem], int]:
    url = loc.url_of(meta.path)
    try:
        size = loc.size(meta.path)
    except CheckpointError as exc:
        return [Problem(url, "is missing", "missing", meta.rank) if isinstance(exc, FileNotFoundError)
                else Problem(url, str(exc).removeprefix(url + ": ").removeprefix(url + " "),
                             "storage", meta.rank)], 0
    problems: list[Problem] = []
    if size != meta.bytes:
        problems.append(
            Problem(url, f"is {size} bytes, the manifest says {meta.bytes} (truncated or replaced?)",
                    "size", meta.rank)
        )
    try:
        header, header_crc = read_header(loc, meta.path, size)
    except CheckpointError as exc:
        problems.append(Problem(url, str(exc).removeprefix(url + ": "), "header", meta.rank))
        return problems, 0
    if meta.rank is not None:
        problems += check_shard_header(manifest, meta.rank, header, url)
    # Stream the data section tensor by tensor: per-tensor CRCs, combined into the file's.
    pieces = PieceChecksums()
    pieces.add(0, header.data_start, header_crc)
    buf = bytearray(chunk)
    bad_tensors = []
    for entry in sorted(header.tensors.values(), key=lambda e: e.start):
        crc = 0
        pos = entry.start
        while pos < entry.end:
            n = min(chunk, entry.end - pos)
            view = memoryview(buf)[:n]
            try:
                loc.read_into(meta.path, pos, view)
            except CheckpointError as exc:
                problems.append(Problem(url, str(exc).removeprefix(url + " "), "size", meta.rank))
                return problems, pos
            crc = crc32c(view, crc)
            tracker.add(n)
            pos += n
        pieces.add(entry.start, entry.nbytes, crc)
        recorded = meta.tensors.get(entry.name)
        if recorded is not None and parse_checksum(recorded) != crc:
            bad_tensors.append(entry.name)
    try:
        whole = pieces.combine(size)
    except ValueError:
        whole = None  # gaps between tensors: only a file we did not write; tensors still checked
    if bad_tensors or (whole is not None and whole != parse_checksum(meta.checksum)):
        which = f" in tensor(s) {bad_tensors}" if bad_tensors else ""
        problems.append(
            Problem(url, f"checksum mismatch{which}: the data is corrupted (restore this file "
                    "from a good copy)", "checksum", meta.rank)
        )
    return problems, size
