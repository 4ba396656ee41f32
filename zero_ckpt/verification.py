"""``verify``: read every file of a checkpoint once and report everything that is wrong."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zero_ckpt import knobs
from zero_ckpt.errors import CheckpointError, Problem
from zero_ckpt.formats.registry import detect, format_module
from zero_ckpt.manifest import Manifest
from zero_ckpt.storage import open_location
from zero_ckpt.transfer import ProgressFn

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
    verifies that one (a note says so); other formats are checked as their package's
    ``verify`` says (DeepSpeed, DCP: structure, sizes and the zip CRC-32 of every record). Returns every problem found; raises only for storage failures that prevent reading
    at all."""
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
            report.format = detect(loc)
            module = format_module(report.format)
        except CheckpointError as exc:
            message = str(exc).removeprefix(loc.url + ": ").removeprefix(loc.url + " ")
            report.problems.append(Problem(loc.url, message, "format"))
            return report
        check = getattr(module, "verify", None)
        if check is not None:
            return check(loc, report, chunk, progress, workers)
        return _verify_view(loc, module, report, chunk, progress)


def _verify_view(loc: Any, module: Any, report: VerifyReport, chunk: int, progress: ProgressFn | None) -> VerifyReport:
    """A format without a check of its own: its metadata is read (every extent located) and
    every byte the view holds is read once (a missing or short file is a problem)."""
    from zero_ckpt.transfer import ProgressTracker

    report.method = "structure"
    try:
        view = module.open_view(loc)
    except CheckpointError as exc:
        report.problems.append(Problem(exc.path or loc.url, str(exc), "structure", exc.rank))
        return report
    report.manifest = view.manifest
    pieces = [e for ex in view.state.values() for e in ex] + [e for t in view.model for e in t.pieces]
    tracker = ProgressTracker(progress, sum(e.numel for e in pieces))
    buf = bytearray(chunk)
    from zero_ckpt.safetensors_format import dtype_size

    for e in pieces:
        nbytes = e.numel * dtype_size(e.dtype)
        pos = 0
        try:
            while pos < nbytes:
                n = min(chunk, nbytes - pos)
                loc.read_into(e.file, e.byte_start + pos, memoryview(buf)[:n])
                pos += n
        except CheckpointError as exc:
            report.problems.append(Problem(loc.url_of(e.file), str(exc), "size"))
            continue
        tracker.add(e.numel)
        report.bytes_checked += nbytes
    report.files_checked = len({e.file for e in pieces})
    report.notes.append(f"{report.format} checkpoint: records no checksums; its structure was checked "
                        "and every byte read")
    return report
