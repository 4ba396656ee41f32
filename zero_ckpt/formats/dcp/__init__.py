"""PyTorch Distributed Checkpoint (DCP, ``torch.distributed.checkpoint``) support, low level.

:mod:`.metadata` reads and writes the ``.metadata`` pickle as plain data (restricted unpickler,
no torch); :mod:`.records` locates, decodes and encodes the torch.save records of the
``.distcp`` files by byte range. Nothing here imports torch.
"""

from zero_ckpt.formats.dcp.metadata import (
    DCP_METADATA_FILE,
    DcpBytes,
    DcpChunk,
    DcpFormatError,
    DcpMetadata,
    DcpStorageMeta,
    DcpTensor,
    read_dcp_metadata,
    write_dcp_metadata,
)
from zero_ckpt.formats.dcp.records import (
    TensorRecordLayout,
    encode_bytes_item,
    encode_tensor_record,
    locate_tensor_record,
    read_bytes_item,
    tensor_record_bytes,
)

__all__ = [
    "DCP_METADATA_FILE",
    "DcpBytes",
    "DcpChunk",
    "DcpFormatError",
    "DcpMetadata",
    "DcpStorageMeta",
    "DcpTensor",
    "read_dcp_metadata",
    "write_dcp_metadata",
    "TensorRecordLayout",
    "encode_bytes_item",
    "encode_tensor_record",
    "locate_tensor_record",
    "read_bytes_item",
    "tensor_record_bytes",
]


# ----- the registry's entry points -------------------------------------------------------------

from typing import Any  # noqa: E402

NAME = "dcp"
WRITER = "zero_ckpt.formats.dcp.writing:write_view"


def detect(loc: Any) -> bool:
    """A folder holding DCP's ``.metadata``."""
    return not loc.is_file() and loc.exists(DCP_METADATA_FILE)


def open_view(loc: Any) -> Any:
    """The DCP checkpoint at ``loc`` (a model + torch optimizer) as a source view
    (:mod:`zero_ckpt.formats.dcp.reading`)."""
    from zero_ckpt.formats.dcp.reading import dcp_view

    return dcp_view(loc)


def precheck(loc: Any, view: Any) -> None:
    """DCP records no checksums: every record the view reads is checked against the zip
    CRC-32s ``torch.save`` stored in it (jobs that read every chunk whole check them as they
    stream instead, and skip this)."""
    from zero_ckpt.errors import CorruptShardError, raise_problems
    from zero_ckpt.formats.dcp.checking import check_records, records_of
    from zero_ckpt.formats.dcp.reading import read_dcp

    problems, _ = check_records(loc, records_of(read_dcp(loc).meta))
    raise_problems(problems, CorruptShardError)


def verify(loc: Any, report: Any, chunk: int, progress: Any, workers: int | None = None) -> Any:
    """``zero-ckpt verify``: the structure (metadata parsed, every chunk located and tiling its
    tensor, the optimizer's params and state consistent), then every record's zip CRC-32s."""
    from zero_ckpt.errors import CheckpointError, Problem
    from zero_ckpt.formats.dcp.checking import check_records, records_of
    from zero_ckpt.formats.dcp.reading import dcp_view, read_dcp
    from zero_ckpt.transfer import ProgressTracker

    report.format, report.method = NAME, "zip-crc32"
    try:
        view = dcp_view(loc)
        meta = read_dcp(loc).meta
    except CheckpointError as exc:
        report.problems.append(Problem(exc.path or loc.url, str(exc), "structure", exc.rank))
        return report
    report.manifest = view.manifest
    records = records_of(meta)
    tracker = ProgressTracker(progress, sum(n for _, _, n, _ in records))
    problems, nbytes = check_records(loc, records, chunk, tracker.add)
    report.problems += problems
    report.bytes_checked += nbytes
    report.files_checked += len({r[0] for r in records}) + 1
    report.notes.append(
        "DCP checkpoint: metadata and layout cross-checked, and every record compared with the "
        "zip CRC-32 torch.save stores in it (DCP records no checksums of its own; convert it to "
        "get zero-ckpt's)"
    )
    return report
