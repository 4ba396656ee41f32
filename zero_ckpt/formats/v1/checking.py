"""``zero-ckpt verify`` for format v1: every file read once against the manifest's CRC32Cs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from zero_ckpt.checks import check_shard_header
from zero_ckpt.checksum import PieceChecksums, crc32c, parse_checksum
from zero_ckpt.errors import CheckpointError, Problem
from zero_ckpt.manifest import MANIFEST_NAME, FileMeta, Manifest
from zero_ckpt.storage import Location
from zero_ckpt.transfer import ProgressTracker, load_manifest, read_header, resolve_workers

__all__ = ["verify_v1"]


def verify_v1(loc: Location, report: Any, chunk: int, progress: Any, workers: int | None) -> Any:
    """Manifest consistent, every shard and the model file present, of the recorded size, with
    headers matching the layout and checksums (whole file and per tensor) matching; a claim
    marker (an unfinished job's output) is reported too."""
    from zero_ckpt.destination import read_claim

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
