"""DeepSpeed ZeRO stage 1/2 checkpoints: reading (:mod:`.reading`, a DeepSpeed run or tag folder
as a :class:`~zero_ckpt.view.SourceView`) and writing (:mod:`.writing`, any view as the run
folder DeepSpeed would have saved at another data-parallel size, or in its universal layout).

This module holds the registry's entry points. It is torch-free and imports its submodules
only inside functions (the registry imports it to detect formats); the public names of the
submodules are re-exported lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NAME", "WRITER", "WRITERS", "detect", "open_view", "precheck", "verify"]

NAME = "deepspeed"
WRITER = "zero_ckpt.formats.deepspeed.writing:write_view"
#: Every target this package writes (``convert --to-format``, ``reshard --format``).
WRITERS = {
    "deepspeed": WRITER,
    "deepspeed-universal": "zero_ckpt.formats.deepspeed.writing:write_universal_view",
}

# public names of the submodules, imported on first access
_READING = (
    "DEEPSPEED_ALIGN", "DeepSpeedFormatError", "DeepSpeedView", "NO_CHECKSUM", "is_deepspeed_checkpoint",
    "open_deepspeed", "read_deepspeed", "verify_deepspeed_files",
)
_WRITING = (
    "DEEPSPEED_FORMAT_VERSION", "DeepSpeedWriteError", "write_deepspeed", "write_deepspeed_universal",
    "write_universal_view", "write_view",
)


def __getattr__(name: str) -> Any:
    if name in _READING:
        from zero_ckpt.formats.deepspeed import reading as module
    elif name in _WRITING:
        from zero_ckpt.formats.deepspeed import writing as module  # imports torch
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


def detect(loc: Any) -> bool:
    """A DeepSpeed run folder (``latest``) or ``global_stepN`` folder of ZeRO-1/2 files."""
    from zero_ckpt.formats.deepspeed.reading import is_deepspeed_checkpoint

    return not loc.is_file() and loc.exists() and is_deepspeed_checkpoint(loc)


def open_view(loc: Any) -> Any:
    """The DeepSpeed checkpoint at ``loc`` as a source view: rank r's optim file holds the real
    elements of its partition (one extent per rank and key), the model states file the
    module-only tensors. DeepSpeed records no checksums (see :func:`precheck`)."""
    from zero_ckpt.formats.deepspeed.reading import source_view

    return source_view(loc)


def precheck(loc: Any, view: Any) -> None:
    """DeepSpeed records no checksums: its files are checked against their zip CRC-32s before
    an output is committed, so a damaged source never shapes a committed output."""
    from zero_ckpt.formats.deepspeed.reading import precheck_files

    precheck_files(loc)


def verify(loc: Any, report: Any, chunk: int, progress: Any, workers: int | None = None) -> Any:
    """``zero-ckpt verify``: the structure, then every byte of every file against the zip
    CRC-32 ``torch.save`` stores per record."""
    from zero_ckpt.formats.deepspeed.reading import verify_checkpoint

    return verify_checkpoint(loc, report, chunk, progress)
